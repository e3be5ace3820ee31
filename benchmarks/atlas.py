"""The latent atlas at 2^12, 2^14 and 2^16 latents: bytes on disk, seconds and peak memory, per latent.

    .venv/bin/python benchmarks/atlas.py [--widths 4096,16384,65536] [--contexts 1024] [--steps 60]

Trains one TopK dictionary (k 32) per width on the demo store's `blocks.6.hook_resid_post`
(`make demo` writes runs/demo/store; the runs are kept in runs/bench/atlas/ and reused), then runs
`sae-jax atlas RUN --contexts N --text FILE` on each, one process at a time, on the same text: the
last books of the embedded corpus's train split, as JSONL (the atlas reads any text; this measures
size and time, not what the latents mean). Reported per width: latents that fired, examples kept,
the bytes of the data files (per latent), of the text and vocabulary files and in all, the
command's wall seconds, the scan's seconds (the model forward and the tables) and the rest
(loading, logit effects, writing), and the process's peak resident memory.
Prints a table, writes runs/bench/atlas.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _timing import write_json
from optimizer_state import cpu_name

HOOK = "blocks.6.hook_resid_post"
ROOT = Path("runs/bench/atlas")


def corpus(path: Path, contexts: int) -> None:
    """The train split's last chapters as JSONL, at least `contexts` x 128 tokens' worth."""
    from sae_jax.data.text import documents

    docs = list(documents("embedded", "", "train"))
    out, chars = [], 0
    for d in reversed(docs):
        out.append(json.dumps({"text": d}))
        chars += len(d)
        if chars > contexts * 128 * 6:  # ~4 characters a token, with room
            break
    path.write_text("\n".join(reversed(out)) + "\n")


def train(width: int, steps: int, store: str) -> Path:
    """`sae-jax train` in its own process (this one stays small: a child forked from it would
    count its pages in the atlas's peak memory)."""
    run = ROOT / f"w{width}"
    sets = dict(store=store, run_dir=run, hooks=HOOK, widths=width, ks=32, steps=steps, batch_size=4096, progress=False)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "sae_jax.cli", "train", *(f"--config.train.{k}={v}" for k, v in sets.items())],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"training w{width} failed:\n{r.stderr[-3000:]}")
    print(f"trained w{width}: {time.perf_counter() - t0:.0f} s ({run})", flush=True)
    return run


def run_atlas(run: Path, out: Path, contexts: int, text: Path) -> dict:
    from sae_jax.eval.atlas_files import js_payload

    cmd = [sys.executable, "-m", "sae_jax.cli", "atlas", str(run), "--contexts", str(contexts), "--text", str(text), "--out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")

    def size(paths) -> int:
        return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())

    (meta_file,) = out.glob("*.meta.json")
    meta = json.loads(meta_file.read_text())
    data = size([out / "data" / "0"])
    text_bytes = size([out / "data" / "text", out / "data" / "vocab.js"])
    total = size([out])
    shards = [js_payload(f) for f in sorted((out / "data" / "0").glob("*.js"))]
    kept = sum(len(r["top"]) + len(r["samples"]) for s in shards for r in s)
    w = meta["width"]
    return {
        "width": w,
        "fired": meta["fired"],
        "positions": meta["positions_read"],
        "examples": kept,
        "data_bytes": data,
        "text_bytes": text_bytes,
        "total_bytes": total,
        "bytes_per_latent": total / w,
        "data_bytes_per_latent": data / w,
        "wall_s": wall,
        "scan_s": meta["seconds"],
        "rest_s": wall - meta["seconds"],
        "s_per_1k_latents": 1000 * wall / w,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "stdout": stdout.strip().splitlines(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="4096,16384,65536")
    ap.add_argument("--contexts", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--store", default="runs/demo/store")
    a = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    text = ROOT / "text.jsonl"
    corpus(text, a.contexts)
    rows = []
    for width in (int(w) for w in a.widths.split(",")):
        run = train(width, a.steps, a.store)
        r = run_atlas(run, ROOT / f"atlas_w{width}", a.contexts, text)
        rows.append(r)
        print(f"atlas w{width}: {r['wall_s']:.1f} s, {r['total_bytes'] / 1e6:.1f} MB", flush=True)
    print(f"\nCPU: {cpu_name()} ({os.cpu_count()} cores); {a.contexts} contexts of 128 tokens, top 20 + samples 20, window 24,8")
    print(
        "| latents | fired | examples | data B/latent | text+vocab MB | total MB | B/latent | wall s | scan s | rest s | s per 1k latents | peak RSS MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['width']:,} | {r['fired']:,} | {r['examples']:,} | {r['data_bytes_per_latent']:,.0f} | {r['text_bytes'] / 1e6:.2f} | "
            f"{r['total_bytes'] / 1e6:.1f} | {r['bytes_per_latent']:,.0f} | {r['wall_s']:.1f} | {r['scan_s']:.1f} | {r['rest_s']:.1f} | "
            f"{r['s_per_1k_latents']:.2f} | {r['peak_rss_mb']:,.0f} |"
        )
    write_json("atlas.json", {"cpu": cpu_name(), "cores": os.cpu_count(), "contexts": a.contexts, "steps": a.steps, "rows": rows})


if __name__ == "__main__":
    main()
