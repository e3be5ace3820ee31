"""The atlas on disk: each example once, a token window around it, activations as bytes.

    atlas/index.html               the page (eval/html.py) and a small index of the members
    atlas/<member>.meta.json       settings, counts, histogram edges, the window
    atlas/data/<m>/<s>.js          latents [s * SHARD, (s + 1) * SHARD) of member m:
                                   `atlasShard(m, s,\\n[record, ...]\\n);`
    atlas/data/text/<t>.js         the tokens of the contexts the examples lie in, contexts
                                   [t * per_file, (t + 1) * per_file): `atlasText(t,\\n{"<context>":
                                   [start, [token id, ...]], ...}\\n);`: the positions from
                                   `start` that the windows of its examples span
    atlas/data/vocab.js            `atlasVocab(\\n{"<token id>": "text", ...}\\n);`: the tokens used

The page loads these with script tags (a `file://` page may load scripts, not fetch files); in
Python `read_atlas` returns the records with every example expanded (tokens, activations).

A record: {"latent", "count" (firings), "frequency" (firings / positions read), "max_activation",
"mean_activation", "histogram" (counts per bin of the member's `histogram_edges`), "logits"
({"promoted", "suppressed"}: [token, effect] pairs; text atlases), "head_attribution" (attn_z),
"top": [example] (largest first), "samples": [example] (a uniform sample of the latent's
firings, smallest activation first)}.
An example: [context, position, activation, [d, q, d, q, ...]]: the latent's activation at
`position + d` of the context is q / 255 * max_activation (0 at the offsets not listed; offsets
from -before to after). The text holds every context once, however many latents show it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

SHARD = 64  # latents per data file
TEXT_TOKENS = 16384  # tokens per text file (contexts per file: this / ctx_len)
LEVELS = 255


def js_file(path: Path, call: str, args: tuple, payload) -> None:
    """`call(args,\n<payload as JSON>\n);`: a script the page loads, and JSON between its first and
    last line for any other reader."""
    blob = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    head = call + "(" + "".join(f"{a}," for a in args)
    path.write_text(f"{head}\n{blob}\n);\n", encoding="utf-8")


def js_payload(path: Path):
    """The JSON a `js_file` holds."""
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text[text.index("\n") + 1 : text.rindex("\n);")])


def f32(x) -> float:
    """A float32 as the shortest decimal that reads back as the same float32 (JSON stays short)."""
    return float(str(np.float32(x)))


def quantise(q: np.ndarray, scale: np.ndarray, max_act: np.ndarray) -> np.ndarray:
    """Windows stored as levels of each window's own maximum (`scale`) [..., n, W], as levels of
    the latent's maximum activation [...] (within one level of the exact value)."""
    f = scale[..., None] / np.maximum(max_act, 1e-30)[..., None, None]
    return np.clip(np.rint(q.astype(np.float32) * f), 0, LEVELS).astype(np.uint8)


def examples(table, rows: slice, max_act: np.ndarray, before: int, ascending: bool = False) -> list[list[list]]:
    """Per latent of `rows`, its examples [context, position, activation, [d, q, ...]] (the
    table's order, largest key first; `ascending`: by activation, smallest first)."""
    key, act, where = table.key[rows], table.act[rows], table.where[rows]
    q = quantise(table.q[rows], table.scale[rows], max_act)
    n = key.shape[1]
    valid = np.isfinite(key)  # the valid entries come first in each row (merge keeps them sorted)
    if ascending:
        order = np.argsort(np.where(valid, act, np.inf), axis=1, kind="stable")
        act, where, q = (np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), 1) for a in (act, where, q))
    lat, j, w = np.nonzero(q * valid[..., None])
    starts = np.concatenate([[0], np.cumsum(np.bincount(lat * n + j, minlength=q.shape[0] * n))]) * 2
    pairs = np.stack([w - before, q[lat, j, w]], 1).reshape(-1).tolist()
    acts = list(map(float, act.astype(np.str_).reshape(-1)))  # each float32 as its shortest decimal
    ctx, pos = where[..., 0].reshape(-1).tolist(), where[..., 1].reshape(-1).tolist()
    counts = valid.sum(1).tolist()
    return [[[ctx[e], pos[e], acts[e], pairs[starts[e] : starts[e + 1]]] for e in range(r * n, r * n + c)] for r, c in enumerate(counts)]


class TextSpans:
    """Per context, the span of positions some example's window covers (over every member)."""

    def __init__(self):
        self.spans: dict[int, list[int]] = {}

    def add(self, where: np.ndarray, valid: np.ndarray, before: int, after: int, ctx_len: int) -> None:
        w = where[valid]
        if len(w) == 0:
            return
        c = w[:, 0]
        order = np.argsort(c, kind="stable")
        c, lo, hi = c[order], np.maximum(w[order, 1] - before, 0), np.minimum(w[order, 1] + after + 1, ctx_len)
        uc, first = np.unique(c, return_index=True)
        los, his = np.minimum.reduceat(lo, first), np.maximum.reduceat(hi, first)
        for ci, a, b in zip(uc.tolist(), los.tolist(), his.tolist(), strict=True):
            s = self.spans.get(ci)
            self.spans[ci] = [a, b] if s is None else [min(s[0], a), max(s[1], b)]

    def write(self, data: Path, tokens_of, ctx_len: int) -> tuple[int, set[int]]:
        """`data/text/<t>.js`; returns (contexts per file, token ids written)."""
        per_file = max(1, TEXT_TOKENS // max(ctx_len, 1))
        (data / "text").mkdir(parents=True, exist_ok=True)
        files: dict[int, dict] = {}
        used: set[int] = set()
        for c in sorted(self.spans):
            a, b = self.spans[c]
            ids = tokens_of(c, a, b)
            used.update(ids)
            files.setdefault(c // per_file, {})[str(c)] = [a, ids]
        for t, payload in files.items():
            js_file(data / "text" / f"{t}.js", "atlasText", (t,), payload)
        return per_file, used


def write_vocab(data: Path, ids: set[int], decode) -> None:
    js_file(data / "vocab.js", "atlasVocab", (), {str(t): decode(t) for t in sorted(ids) if t >= 0})


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` (a folder) by `tmp`, leaving no half of either."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class Atlas:
    """An atlas folder read back: `names`, `meta(member)`, `record(member, latent)` and
    `records(member)` with examples expanded to {"activation", "context", "position", "index"
    (of the activating token in `tokens`), "tokens", "token_ids", "activations"}, and the samples
    as "quantiles" (quartiles of their activation)."""

    def __init__(self, path):
        self.root = Path(path)
        page = self.root / "index.html"
        if not page.is_file():
            raise FileNotFoundError(f"{self.root}: no atlas here (index.html is missing)")
        text = page.read_text(encoding="utf-8")
        blob = text.split('<script id="atlas-index" type="application/json">')[1].split("</script>")[0]
        self.index = json.loads(blob.replace("<\\/", "</"))
        self.names = [m["name"] for m in self.index["members"]]
        self._shards: dict[tuple[int, int], list] = {}
        self._text: dict[int, dict] = {}
        self._vocab: dict | None = None

    def _member(self, member) -> int:
        if isinstance(member, int):
            return member
        if member not in self.names:
            raise KeyError(f"{self.root}: no member {member!r} in the atlas (members: {', '.join(self.names)})")
        return self.names.index(member)

    def meta(self, member) -> dict:
        return json.loads((self.root / f"{self.names[self._member(member)]}.meta.json").read_text())

    def _shard(self, m: int, s: int) -> list:
        if (m, s) not in self._shards:
            self._shards = {(m, s): js_payload(self.root / "data" / str(m) / f"{s}.js")}  # one shard held at a time
        return self._shards[(m, s)]

    def _span(self, c: int) -> list:
        t = c // self.index["text_per_file"]
        if t not in self._text:
            self._text[t] = js_payload(self.root / "data" / "text" / f"{t}.js")
        return self._text[t][str(c)]

    def _decode(self, t: int) -> str:
        if self._vocab is None:
            self._vocab = js_payload(self.root / "data" / "vocab.js")
        return self._vocab.get(str(t), "")

    def _example(self, mem: dict, rec: dict, e: list) -> dict:
        c, pos, act, pairs = e
        before, after = mem["window"]
        start, ids = self._span(c)
        lo, hi = max(start, pos - before), min(start + len(ids), pos + after + 1)
        window = ids[lo - start : hi - start]
        levels = dict(zip(pairs[::2], pairs[1::2], strict=True))
        acts = [round(levels.get(q - pos, 0) / LEVELS * rec["max_activation"], 4) for q in range(lo, hi)]
        if mem.get("kind") == "rows":
            tokens = [f"row {mem['first_row'] + c}" + (f" · token {t}" if t >= 0 else "") for t in window]
        else:
            tokens = [self._decode(t) for t in window]
        return {
            "activation": act,
            "context": c,
            "position": pos,
            "index": pos - lo,
            "tokens": tokens,
            "token_ids": window,
            "activations": acts,
        }

    def record(self, member, latent: int) -> dict:
        m = self._member(member)
        mem = self.index["members"][m]
        if not 0 <= latent < mem["width"]:
            raise IndexError(f"{self.root}: latent {latent} outside 0..{mem['width'] - 1} of {mem['name']}")
        shard = self.index["shard"]
        rec = dict(self._shard(m, latent // shard)[latent % shard])
        rec["top"] = [self._example(mem, rec, e) for e in rec["top"]]
        samples = [self._example(mem, rec, e) for e in rec.pop("samples")]
        rec["quantiles"] = quartiles(samples)
        return rec

    def records(self, member):
        m = self._member(member)
        for lat in range(self.index["members"][m]["width"]):
            yield self.record(m, lat)


def quartiles(examples: list[dict], bins: int = 4) -> list[dict]:
    """Examples (ascending activation) in `bins` groups of equal count."""
    if not examples:
        return []
    edges = np.floor(np.arange(bins + 1) * len(examples) / bins + 0.5).astype(int)  # as the page rounds (half up)
    return [{"range": [b / bins, (b + 1) / bins], "examples": examples[edges[b] : edges[b + 1]]} for b in range(bins)]


def read_atlas(path) -> Atlas:
    """The atlas `sae-jax atlas` wrote in `path`."""
    return Atlas(path)
