"""A latent cache in the layout of EleutherAI's delphi (PyPI `eai-delphi`), written while the atlas
streams its text: `sae-jax atlas RUN --delphi DIR`.

Per member, `DIR/<member>/latents/<hookpoint>/`:
- `<start>_<end>.safetensors` per latent range (end inclusive, `n_splits` ranges of equal width):
  `locations` uint32 [N, 3] (context, position, latent - start), `activations` float16 [N] (every
  nonzero activation of a latent in the range), `tokens` int32 [contexts, ctx_len] (the text read);
- `config.json`: delphi's CacheConfig fields (cache_ctx_len, n_tokens, n_splits, batch_size, the
  text's dataset fields) and `model_name`;
and `DIR/<member>/tokenizer.json` (the model's tokenizer, for
`PreTrainedTokenizerFast(tokenizer_file=...)`: delphi decodes examples with a Hugging Face
tokenizer). The hookpoint is the Hugging Face module the hook is the output of (as the sparsify
export names it), else the hook's own name: delphi pairs the cache with the sparsify export.

Memory is bounded whatever the width and the amount of text: each batch's firings are appended to
per-range raw files, and each safetensors file is assembled from them at the end by streaming
(header, then the raw bytes) in a hidden staging folder that becomes `latents/<hookpoint>` only when
every file is complete: an interrupted run leaves no cache delphi would read.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

CHUNK = 1 << 24  # bytes copied at a time when assembling


class DelphiCache:
    def __init__(self, out: Path, hookpoint: str, width: int, n_splits: int, ctx_len: int, config: dict):
        if n_splits < 1 or n_splits > width:
            raise ValueError(f"--delphi-splits {n_splits}: between 1 and the width ({width})")
        self.dir = Path(out) / "latents" / hookpoint
        self.tmp = Path(out) / f".latents.{hookpoint}.partial"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        # delphi's ranges: boundaries linspace(0, width, n_splits + 1), end = next boundary - 1
        self.bounds = np.linspace(0, width, n_splits + 1).astype(np.int64)
        self.files = [
            (open(self.tmp / f"{i}.loc", "wb"), open(self.tmp / f"{i}.act", "wb"))  # noqa: SIM115  (closed in close())
            for i in range(n_splits)
        ]
        self.counts = np.zeros(n_splits, np.int64)
        self.tokens = open(self.tmp / "tokens", "wb")  # noqa: SIM115
        self.n_ctx, self.ctx_len, self.config = 0, ctx_len, config

    def add(self, tokens: np.ndarray, ctx: np.ndarray, pos: np.ndarray, lat: np.ndarray, act: np.ndarray) -> None:
        """One batch: its token rows [b, ctx_len] (contexts numbered on from the previous batches)
        and its firings (context within the batch, position, latent, activation)."""
        split = np.searchsorted(self.bounds, lat, side="right") - 1
        order = np.argsort(split, kind="stable")
        edges = np.searchsorted(split[order], np.arange(len(self.files) + 1))
        loc = np.stack([ctx + self.n_ctx, pos, lat - self.bounds[split]], -1).astype(np.uint32)[order]
        a = act.astype(np.float16)[order]
        for i, (fl, fa) in enumerate(self.files):
            lo, hi = edges[i], edges[i + 1]
            if hi > lo:
                fl.write(loc[lo:hi].tobytes())
                fa.write(a[lo:hi].tobytes())
                self.counts[i] += hi - lo
        self.tokens.write(np.ascontiguousarray(tokens, np.int32).tobytes())
        self.n_ctx += len(tokens)

    def close(self, tokenizer_json: str | None = None) -> Path:
        for fl, fa in self.files:
            fl.close()
            fa.close()
        self.tokens.close()
        final = self.tmp / "final"  # assembled beside the raw files, renamed into place when complete
        final.mkdir()
        for i in range(len(self.files)):
            start, end = int(self.bounds[i]), int(self.bounds[i + 1]) - 1
            n = int(self.counts[i])
            parts = [
                ("locations", "U32", [n, 3], self.tmp / f"{i}.loc"),
                ("activations", "F16", [n], self.tmp / f"{i}.act"),
                ("tokens", "I32", [self.n_ctx, self.ctx_len], self.tmp / "tokens"),
            ]
            _write_safetensors(final / f"{start}_{end}.safetensors", parts)
        cfg = {**self.config, "cache_ctx_len": self.ctx_len, "n_tokens": self.n_ctx * self.ctx_len, "n_splits": len(self.files)}
        (final / "config.json").write_text(json.dumps(cfg, indent=1))
        if tokenizer_json:
            (self.dir.parent.parent / "tokenizer.json").write_text(tokenizer_json)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        final.rename(self.dir)
        shutil.rmtree(self.tmp)
        return self.dir


def _write_safetensors(path: Path, parts: list[tuple[str, str, list[int], Path]]) -> None:
    """A safetensors file from raw little-endian files, streamed: 8-byte header size, the JSON
    header (padded to 8 bytes), then each tensor's bytes in order."""
    header, offset = {}, 0
    for name, dtype, shape, src in parts:
        size = src.stat().st_size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for *_, src in parts:
            with open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
    tmp.rename(path)
