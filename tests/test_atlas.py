"""The latent atlas: the streaming tables equal a brute-force pass, the JSONL is as documented,
and the HTML page renders a latent in a real headless browser (Debian's chromium)."""

import json
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_cli


def test_streaming_tables_equal_brute_force(lm, tiny_run):
    from sae_jax.eval.atlas import BEFORE, latent_encoder, scan_member
    from sae_jax.eval.inputs import text_contexts
    from sae_jax.model.hooks import parse_hook
    from sae_jax.runs import open_run

    run = open_run(tiny_run)
    m = 3
    mem = run.members[m]
    p = run.folded(m)
    ctx = text_contexts(run.store_meta, lm, 20, "heldout")
    enc = latent_encoder(lm, parse_hook(mem.hook, lm.cfg.n_layers), mem.k, 100.0)
    top, samples = 5, 7
    tops, samp, counts, sums, positions, hist = scan_member(p, mem.k, enc, ctx, 3, top, samples)  # 7 batches, the last short

    # brute force: every firing of every latent over all contexts at once
    v, i, keep = (np.asarray(a) for a in enc({k: jnp.asarray(a) for k, a in p.items()}, jnp.asarray(ctx)))
    assert positions == keep.sum()
    firings = {}
    for c, t, s in zip(*np.nonzero(v > 0), strict=True):
        firings.setdefault(int(i[c, t, s]), []).append((float(v[c, t, s]), c, t))
    assert counts.sum() == sum(len(f) for f in firings.values())
    for lat in range(mem.width):
        f = sorted(firings.get(lat, []), reverse=True)
        assert counts[lat] == len(f)
        want = [a for a, _, _ in f[:top]]
        got = tops.act[lat][np.isfinite(tops.key[lat])]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for j in range(len(want)):  # the stored window is the context around the firing
            c, t = tops.where[lat, j]
            assert v[c, t][i[c, t] == lat][0] == pytest.approx(tops.act[lat, j])
            # the window: the latent's activation at each position around the firing, in levels of
            # the window's maximum (within half a level)
            lo, hi = t - BEFORE, t + tops.q.shape[-1] - BEFORE
            exact = np.array([v[c, q][i[c, q] == lat].sum() if 0 <= q < ctx.shape[1] else 0.0 for q in range(lo, hi)])
            assert tops.scale[lat, j] == pytest.approx(exact.max()) and exact[BEFORE] == pytest.approx(tops.act[lat, j])
            np.testing.assert_allclose(tops.q[lat, j] / 255 * tops.scale[lat, j], exact, atol=0.5 / 255 * exact.max() + 1e-6)
        # the random sample: min(samples, firings) genuine firings, no repeats
        n_s = int(np.isfinite(samp.key[lat]).sum())
        assert n_s == min(samples, len(f))
        spots = {(int(c), int(t)) for c, t in samp.where[lat][:n_s]}
        assert len(spots) == n_s and spots <= {(c, t) for _, c, t in f}
        assert sums[lat] == pytest.approx(sum(a for a, _, _ in f), rel=1e-5)
        # the histogram: every firing in the bin its value falls in (end bins take what lies beyond)
        want_h = np.bincount(
            np.clip(np.searchsorted(hist.edges, [a for a, _, _ in f], side="right") - 1, 0, hist.BINS - 1), minlength=hist.BINS
        )
        np.testing.assert_array_equal(hist.counts[lat], want_h)


def test_the_text_kept_is_what_the_examples_lie_in(lm, tiny_run):
    """The atlas reads text as a stream and keeps a context only while a table entry lies in it."""
    from sae_jax.eval.atlas import KeptText, Scanner, batches, latent_encoder
    from sae_jax.eval.inputs import text_context_stream, text_contexts
    from sae_jax.model.hooks import parse_hook
    from sae_jax.runs import open_run

    run = open_run(tiny_run)
    mem = run.members[0]
    p = {k: jnp.asarray(a) for k, a in run.folded(0).items()}
    enc = latent_encoder(lm, parse_hook(mem.hook, lm.cfg.n_layers), mem.k, 100.0)
    scan = Scanner(mem.width, 1, 1)
    kept = KeptText(prune_every=2)
    for s, tok, padded in batches(text_context_stream(run.store_meta, lm, 80, "heldout"), 3):
        v, i, keep = (np.asarray(a)[: len(tok)] for a in enc(p, jnp.asarray(padded)))
        scan.add(tok, v, i, keep, s)
        kept.add(s, tok, [scan])
    kept.prune([scan])
    ctx = text_contexts(run.store_meta, lm, 80, "heldout")
    used = {int(c) for t in (scan.tops, scan.samp) for c in t.where[..., 0][np.isfinite(t.key)]}
    assert kept.read == len(ctx) == 80 and set(kept.text) == used and len(used) < 80
    for c in used:
        np.testing.assert_array_equal(kept.text[c], ctx[c])
        assert kept.tokens(c, 3, 9) == ctx[c, 3:9].tolist()


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed for the atlas page test (`make chromium` installs it)"
    return exe


def _dump_dom(url, tmp_path):
    flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking --disable-component-update --disable-sync"
    cmd = [_chromium(), *flags.split(), f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=3000", "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.browser
def test_atlas_cli_files_and_page_in_a_browser(lm, tiny_run, tmp_path):
    from sae_jax.eval.atlas_files import js_payload, read_atlas
    from sae_jax.eval.inputs import text_contexts
    from sae_jax.runs import open_run

    out = tmp_path / "atlas"
    args = ["--contexts", "12", "--top", "4", "--samples", "8", "--batch-size", "4", "--window", "6,3", "--out", str(out)]
    r = run_cli("atlas", str(tiny_run), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    members = json.loads((tiny_run / "members.json").read_text())
    atlas = read_atlas(out)
    assert atlas.names == members
    z_member = next(i for i, n in enumerate(members) if "hook_z" in n)
    recs = list(atlas.records(z_member))
    meta = atlas.meta(z_member)
    assert [r["latent"] for r in recs] == list(range(meta["width"])) and meta["window"] == [6, 3]
    fired = [r for r in recs if r["count"] > 0]
    assert len(fired) == meta["fired"] > 0
    rec = max(fired, key=lambda r: r["count"])
    assert len(rec["head_attribution"]) == meta["n_heads"] == 9
    ex = rec["top"][0]
    assert ex["activation"] == rec["max_activation"] and ex["activations"][ex["index"]] == pytest.approx(ex["activation"], rel=1e-3)
    assert len(ex["tokens"]) == len(ex["token_ids"]) == len(ex["activations"]) <= 6 + 1 + 3
    acts = sorted(e["activation"] for q in rec["quantiles"] for e in q["examples"])
    assert len(acts) == min(8, rec["count"]) and acts[-1] <= rec["max_activation"]
    # every example's window is the text around its place: the same contexts, read again
    ctx = text_contexts(open_run(tiny_run).store_meta, lm, 12, "heldout")
    checked = 0
    for rec_ in fired[:40]:
        for e in rec_["top"] + [e for q in rec_["quantiles"] for e in q["examples"]]:
            c, t = e["context"], e["position"]
            lo = max(t - 6, 0)
            assert e["token_ids"] == ctx[c, lo : t + 4].tolist() and e["index"] == t - lo
            assert e["tokens"] == [lm.tokenizer.decode([i], skip_special_tokens=False) for i in e["token_ids"]]
            # the activations within a level of the latent's maximum of the exact ones (level 0 is < half a level)
            assert max(e["activations"]) <= rec_["max_activation"] + 1e-4
            assert abs(e["activations"][e["index"]] - e["activation"]) <= rec_["max_activation"] / 255 + 1e-4
            checked += 1
    assert checked > 100
    # one copy: each context's text once, in the text files; the data a few kB per latent
    spans = [js_payload(f) for f in sorted((out / "data" / "text").glob("*.js"))]
    keys = [c for s in spans for c in s]
    assert len(keys) == len(set(keys)) and {e["context"] for r_ in fired for e in r_["top"]} <= {int(c) for c in keys}
    data = sum(f.stat().st_size for f in (out / "data").rglob("*.js"))
    assert data < 5000 * sum(atlas.meta(m)["width"] for m in members), data

    page = out / "index.html"
    assert page.is_file()
    shards = sorted((out / "data" / str(z_member)).glob("*.js"))
    assert len(shards) == -(-meta["width"] // 64)
    # the page is an index (at most the 500 most frequent latents' ids and counts), not the data:
    # it stays small whatever the width (the demo run's: 17.7 kB for two 4,608-latent members)
    assert page.stat().st_size < 64_000, page.stat().st_size
    index = json.loads(page.read_text().split('type="application/json">')[1].split("</script>")[0])
    assert set(index["members"][z_member]) == {"name", "width", "fired", "frequent", "histogram_edges", "window", "kind"}
    dom = _dump_dom(f"{page.as_uri()}#m={z_member}&l={rec['latent']}", tmp_path)
    card = dom.split('<div id="card">')[1].split("<script")[0]  # the rendered card, not the page's script
    assert f'<h2 id="latent-title">Latent {rec["latent"]}</h2>' in card
    assert card.count('class="head"') == 9
    hit = card.split('class="tok hit"')[1]
    assert "rgba(255,120,0,1.000)" in hit.split(">")[0]  # the top example's firing is the latent's maximum
    first = card.split('class="ctx"')[1].split("</div>")[0]
    assert first.count('<span class="tok') == len(ex["tokens"])
    assert card.count('class="ctx"') == len(rec["top"]) + len(acts)
    # histogram bars (one per bin) and the logit effects, as the data files have them
    assert card.count('class="hbar"') == len(rec["histogram"]) == len(meta["histogram_edges"]) - 1
    assert sum(rec["histogram"]) == rec["count"]
    assert card.count('class="logit up"') == len(rec["logits"]["promoted"]) == 10
    assert card.count('class="logit down"') == len(rec["logits"]["suppressed"]) == 10
    promoted = [v for _, v in rec["logits"]["promoted"]]
    assert promoted == sorted(promoted, reverse=True) and promoted[0] > rec["logits"]["suppressed"][0][1]
    dom = _dump_dom(f"{page.as_uri()}#m={z_member}&l=99999", tmp_path)
    assert "No latent 99999" in dom
    # a latent in another data file than the first loads too
    last = fired[-1]["latent"]
    dom = _dump_dom(f"{page.as_uri()}#m={z_member}&l={last}", tmp_path)
    assert f'<h2 id="latent-title">Latent {last}</h2>' in dom


def test_atlas_window_must_be_two_counts(tiny_run, tmp_path):
    r = run_cli("atlas", str(tiny_run), "--window", "24", "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and "--window" in r.stderr and "BEFORE,AFTER" in r.stderr and "Traceback" not in r.stderr


def test_logit_effects_are_the_decoder_rows_through_the_unembedding(lm, tiny_run):
    from sae_jax.eval.atlas import logit_effects
    from sae_jax.model.hooks import parse_hook
    from sae_jax.runs import open_run

    run = open_run(tiny_run)
    model = lm.model
    w_u = np.asarray(model.embed[...] if model.cfg.tie_embeddings else model.lm_head[...].T, np.float32).T
    norm_w = np.asarray(model.final_norm.weight[...], np.float32)
    for m, mem in enumerate(run.members[:4]):
        hook = parse_hook(mem.hook, lm.cfg.n_layers)
        w_dec = run.folded(m)["W_dec"][:40]
        ti, tv, bi, bv = logit_effects(lm, hook, w_dec, n=5, chunk=16)
        d = w_dec @ np.asarray(model.blocks[hook.layer].wo[...], np.float32) if hook.point == "attn_z" else w_dec
        want = (d * norm_w) @ w_u
        np.testing.assert_allclose(tv, -np.sort(-want, 1)[:, :5], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bv, np.sort(want, 1)[:, :5], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(want, ti, 1), tv, rtol=1e-4, atol=1e-5)


def test_atlas_bad_member(tiny_run, tmp_path):
    r = run_cli("atlas", str(tiny_run), "--member", "blocks.9.nothing", "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and "blocks.9.nothing" in r.stderr and "members:" in r.stderr


@pytest.mark.peers
def test_delphi_cache_loads_in_delphi_with_the_atlas_top_activations(tiny_run, tmp_path):
    """`sae-jax atlas --delphi`: delphi's own LatentDataset (eai-delphi, .peer-venv) builds a record
    for every latent that fired, and its top windows' maxima are the atlas's top activations."""
    from test_export import PEER_PYTHON

    from sae_jax.eval.atlas_files import read_atlas
    from sae_jax.runs import open_run

    run = open_run(tiny_run)
    mem = run.members[0]
    out, cache = tmp_path / "atlas", tmp_path / "delphi"
    r = run_cli(
        "atlas",
        str(tiny_run),
        "--member",
        mem.name,
        "--contexts",
        "24",
        "--top",
        "30",
        "--out",
        str(out),
        "--delphi",
        str(cache),
        "--delphi-splits",
        "3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "delphi latent cache" in r.stdout
    root = cache / mem.name
    (hookpoint,) = [d.name for d in (root / "latents").iterdir()]
    files = sorted((root / "latents" / hookpoint).glob("*.safetensors"))
    assert len(files) == 3 and not list(root.glob(".*partial"))
    cfg = json.loads((root / "latents" / hookpoint / "config.json").read_text())
    assert cfg["n_splits"] == 3 and cfg["cache_ctx_len"] > 0
    meta = json.loads((out / f"{mem.name}.meta.json").read_text())
    assert cfg["n_tokens"] == meta["text"]["contexts"] * meta["text"]["ctx_len"]

    assert PEER_PYTHON.exists(), f"{PEER_PYTHON} missing: `make peer-venv` builds the venv with eai-delphi"
    p = subprocess.run(
        [str(PEER_PYTHON), str(REPO / "tests" / "peers" / "delphi_records.py"), str(root)], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-4000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["modules"] == [hookpoint] and got["tokens_shape"] == [meta["text"]["contexts"], meta["text"]["ctx_len"]]

    atlas = list(read_atlas(out).records(mem.name))
    fired = [a for a in atlas if a["count"] > 0]
    assert len(fired) > 10 and len(got["latents"]) == len(fired)
    ctx_len, win = meta["text"]["ctx_len"], 16
    checked = 0
    for a in fired:
        rec = got["latents"][f"{hookpoint}:{a['latent']}"]
        assert rec["frequency"] == pytest.approx(a["count"] / cfg["n_tokens"])
        # the atlas's top firings, one per 16-token window of the flattened text, as delphi pools them
        best, window = {}, []
        for e in a["top"]:
            w = (e["context"] * ctx_len + e["position"]) // win
            window.append((w, e["activation"], e["token_ids"][e["index"]]))
            if w not in best or e["activation"] > best[w][0]:
                best[w] = (e["activation"], e["token_ids"][e["index"]])
        # a window whose maximum another firing in it equals in float16 with another token: delphi
        # pools float16 values and keeps the first of the tied positions, not the float32 maximum
        within_tie = {best[w][0] for w, v, t in window if t != best[w][1] and v != best[w][0] and np.float16(v) == np.float16(best[w][0])}
        want = list(best.values())
        if len(a["top"]) < a["count"]:  # windows below the atlas's last kept firing are not all in it
            want = [t for t in want if t[0] > a["top"][-1]["activation"]]
        n = len(want)
        assert n > 0
        # delphi keeps float16: the top n maxima agree as values; the token at each maximum wherever
        # the value is not tied (delphi orders equal maxima arbitrarily, so a tie at the n-th place
        # may put another window of the same value first), nor tied within its window (above)
        want16 = sorted((float(np.float16(v)) for v, _ in want), reverse=True)
        assert sorted(rec["max"][:n], reverse=True) == want16, a["latent"]
        count = {}
        for m in rec["max"]:
            count[m] = count.get(m, 0) + 1
        tok_got = {m: t for m, t in zip(rec["max"], rec["token"], strict=True) if count[m] == 1}
        for v, t in want:
            v16 = float(np.float16(v))
            if count.get(v16) == 1 and sum(float(np.float16(w)) == v16 for w, _ in want) == 1 and v not in within_tie:
                assert tok_got[v16] == t, (a["latent"], v16)
                checked += 1
    assert checked > 100  # tokens compared at that many untied maxima
