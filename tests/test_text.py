"""Text sources and their packing into fixed-length contexts."""

import itertools
import json

import numpy as np
import pytest

from sae_jax.data.contexts import EmptyCorpusError, contexts, pack, window_shuffle
from sae_jax.data.text import KJV_BOOKS, TextSourceError, documents


def test_embedded_corpus_splits():
    train = list(documents("embedded", split="train"))
    held = list(documents("embedded", split="heldout"))
    assert train[0].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert held[0].startswith("Revelation 1\n\n")
    assert len(held) == 22 and len(train) == 1189 - 22  # chapters of the KJV
    assert not any(d.startswith("Revelation") for d in train)
    assert len(KJV_BOOKS) == 66


def test_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    assert list(documents("text", str(tmp_path))) == ["first file", "second file"]
    assert list(documents("text", str(tmp_path / "b.txt"))) == ["second file"]
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert list(documents("jsonl", str(j), text_key="body")) == ["one", "two"]
    with pytest.raises(TextSourceError, match=r"d\.jsonl:1: no field 'text'"):
        list(documents("jsonl", str(j)))
    j.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(TextSourceError, match=r"d\.jsonl:2: invalid JSON"):
        list(documents("jsonl", str(j)))
    with pytest.raises(TextSourceError, match="no .txt/.text/.md files found at"):
        list(documents("text", str(tmp_path / "missing")))
    with pytest.raises(TextSourceError, match="unknown text source 'csv'"):
        documents("csv", "x")


def test_hf_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")  # a dev dependency: installed by `make test`
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["alpha", "beta", "gamma"]})}).save_to_disk(str(tmp_path / "ds"))
    assert list(documents("hf", str(tmp_path / "ds"), split="train")) == ["alpha", "beta", "gamma"]
    with pytest.raises(TextSourceError, match="no split 'test'"):
        list(documents("hf", str(tmp_path / "ds"), split="test"))
    with pytest.raises(TextSourceError, match="no column 'content'"):
        list(documents("hf", str(tmp_path / "ds"), text_key="content"))


def test_tfds_prepared_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")  # a dev dependency: installed by `make test`

    class TinyCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                yield i, {"text": f"document {i}"}

    TinyCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    by_name = sorted(documents("tfds", str(tmp_path), tfds_name="tiny_corpus"))
    by_dir = sorted(documents("tfds", str(tmp_path / "tiny_corpus" / "1.0.0")))
    assert by_name == by_dir == [f"document {i}" for i in range(4)]
    with pytest.raises(TextSourceError, match="cannot be opened"):
        list(documents("tfds", str(tmp_path), tfds_name="no_such_corpus"))


class _CharTok:
    """A stand-in tokenizer (one id per character) to test packing exactly."""

    class _Enc:
        def __init__(self, s):
            self.ids = [ord(c) for c in s]

    def encode_batch(self, docs, add_special_tokens=False):
        return [self._Enc(d) for d in docs]


def test_pack_exact():
    ctx = list(contexts(["abcde", "fgh"], _CharTok(), ctx_len=4, bos_id=1, sep_id=0, window=0, seed=0))
    # stream: a b c d e 0 f g h 0  -> bodies of 3 after BOS
    assert [c.tolist() for c in ctx] == [[1, 97, 98, 99], [1, 100, 101, 0], [1, 102, 103, 104]]
    assert [c.tolist() for c in pack([np.int32([5, 6, 7])], 2, None)] == [[5, 6]]


def test_window_shuffle_is_a_seeded_permutation():
    xs = [np.int32([i]) for i in range(100)]
    a = [int(x[0]) for x in window_shuffle(iter(xs), 16, seed=0)]
    b = [int(x[0]) for x in window_shuffle(iter(xs), 16, seed=0)]
    c = [int(x[0]) for x in window_shuffle(iter(xs), 16, seed=1)]
    assert a == b != c and sorted(a) == list(range(100))
    assert sorted(a[:16]) == list(range(16))  # windows stay windows


def test_contexts_from_real_tokenizer(lm):
    it = contexts(documents("embedded"), lm.tokenizer, 128, lm.bos_id, lm.eos_id, 0, 0)
    first = list(itertools.islice(it, 3))
    assert all(len(c) == 128 and c[0] == lm.bos_id for c in first)
    assert lm.tokenizer.decode(first[0][1:12].tolist()).startswith("Genesis 1\n\nIn the beginning")
    with pytest.raises(EmptyCorpusError):
        next(contexts(["too short"], lm.tokenizer, 128, lm.bos_id, lm.eos_id, 0, 0))


def test_parquet_rows_in_file_and_row_group_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    d.mkdir()
    pq.write_table(pa.table({"text": ["a0", "a1", None, "a3", "a4"], "id": [0, 1, 2, 3, 4]}), d / "part-0.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": ["b0", "b1"], "id": [5, 6]}), d / "part-1.parquet")
    assert pq.ParquetFile(d / "part-0.parquet").num_row_groups == 3
    assert list(documents("parquet", str(d))) == ["a0", "a1", "a3", "a4", "b0", "b1"]  # nulls skipped
    assert list(documents("parquet", str(d / "part-1.parquet"))) == ["b0", "b1"]
    with pytest.raises(TextSourceError, match=r"part-0\.parquet: no column 'body' \(has \['text', 'id'\]\)"):
        list(documents("parquet", str(d), text_key="body"))
    with pytest.raises(TextSourceError, match=r"column 'id' holds int64, not strings"):
        list(documents("parquet", str(d), text_key="id"))
    (d / "part-2.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TextSourceError, match=r"part-2\.parquet: not a readable Parquet file"):
        list(documents("parquet", str(d)))
    with pytest.raises(TextSourceError, match=r"no \.parquet files found"):
        list(documents("parquet", str(tmp_path / "none")))


@pytest.mark.heavy
def test_parquet_harvest_from_the_cli(tmp_path):
    """`data.source=parquet` end to end: a store from a Parquet corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import cli_args, run_cli

    from sae_jax.data.text import kjv_documents

    docs = list(itertools.islice(kjv_documents("train"), 60))
    pq.write_table(pa.table({"content": docs}), tmp_path / "kjv.parquet", row_group_size=16)
    out = tmp_path / "store"
    args = [a for a in cli_args(out) if not a.startswith("--config.data.source")]
    r = run_cli(
        "harvest", *args, "--config.data.source=parquet", f"--config.data.path={tmp_path / 'kjv.parquet'}", "--config.data.text_key=content"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["source"]["source"] == "parquet" and m["source"]["text_key"] == "content"
    assert m["rows"] > 0
