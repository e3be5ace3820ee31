"""`sae-jax eval RUN`: reconstruction on held-out store rows, and the model's loss with each
dictionary spliced in. Field names follow SAEBench's core evaluation.

Reconstruction (per member, over held-out rows x, reconstructions x_hat, latents a):
- `explained_variance` = 1 - FVU, FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over the rows)
- `mse` (mean over rows and dims), `cossim` (mean cos(x, x_hat)); `l2_norm_in`, `l2_norm_out`
  (mean norms), `l2_ratio` (mean ||x_hat|| / ||x||), `relative_reconstruction_bias`
  = sum ||x_hat||^2 / sum <x_hat, x> (the gated-SAE paper's gamma; 1 is unbiased, < 1 shrinkage)
- `l0`, `l1` (mean count and sum of activations; activations in raw units, as exported)
- `frac_alive`, `dead_frac` (no firing on the held-out rows), `dense_frac` (firing on > 10%),
  `freq_over_1_percent`, `freq_over_10_percent`, a log10 density histogram.

Downstream, on held-out text contexts, the dictionary replaces the hook's activation at every
position the store keeps (not BOS/special tokens, not outlier rows: `inputs.splice_mask`):
- `ce_loss_without_sae`, `ce_loss_with_sae`, `ce_loss_with_ablation` (zeros at those positions),
  `ce_loss_score` = (ablation - sae) / (ablation - clean) ("loss recovered")
- `kl_div_with_sae`, `kl_div_with_ablation` (mean over positions of KL(clean || edited)),
  `kl_div_score` = (kl_ablation - kl_sae) / kl_ablation.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.eval.errors import EvalError
from sae_jax.eval.inputs import heldout_rows, load_run_model, missing_model, splice_mask, text_contexts
from sae_jax.model.hooks import parse_hook
from sae_jax.sae import folded

CHUNK = 2048


def reconstruction_metrics(p: dict, x: np.ndarray, k: int, kind: str = "topk") -> dict:
    """SAEBench-named reconstruction and sparsity metrics of dictionary `p` on rows `x` (`kind`
    and the cap `k`: `sae.folded`; `truncated_frac` counts rows that reached the cap)."""
    n, d = x.shape
    w = p["W_enc"].shape[1]
    pj = {key: jnp.asarray(v) for key, v in p.items()}
    acc = {key: 0.0 for key in ("err2", "x2", "cos", "nin", "nout", "ratio", "dot", "xh2", "l0", "l1", "trunc")}
    sum_x = np.zeros(d, np.float64)
    counts = np.zeros(w, np.int64)
    for s in range(0, n, CHUNK):
        xc = x[s : s + CHUNK]
        m = len(xc)
        pad = np.zeros((CHUNK, d), np.float32)
        pad[:m] = xc
        x_hat, v, i = folded.reconstruct(pj, jnp.asarray(pad), k=k, kind=kind)
        x_hat, v, i = np.asarray(x_hat[:m], np.float64), np.asarray(v[:m]), np.asarray(i[:m])
        xd = xc.astype(np.float64)
        nin, nout = np.linalg.norm(xd, axis=1), np.linalg.norm(x_hat, axis=1)
        dot = np.sum(xd * x_hat, axis=1)
        acc["err2"] += float(np.sum((xd - x_hat) ** 2))
        acc["x2"] += float(np.sum(xd**2))
        acc["cos"] += float(np.sum(dot / np.maximum(nin * nout, 1e-12)))
        acc["nin"] += float(nin.sum())
        acc["nout"] += float(nout.sum())
        acc["ratio"] += float(np.sum(nout / np.maximum(nin, 1e-12)))
        acc["dot"] += float(dot.sum())
        acc["xh2"] += float(np.sum(x_hat**2))
        fired = v > 0
        acc["l0"] += float(fired.sum())
        acc["l1"] += float(v.sum())
        acc["trunc"] += float(fired[:, -1].sum()) if kind != "topk" else 0.0
        sum_x += xd.sum(0)
        np.add.at(counts, i[fired], 1)
    total_var = acc["x2"] - float(sum_x @ sum_x) / n
    fvu = acc["err2"] / total_var
    density = counts / n
    hist_edges = np.arange(-8.0, 0.5, 0.5)
    log_d = np.log10(np.maximum(density, 1e-10))
    hist, _ = np.histogram(log_d[density > 0], bins=hist_edges)
    return {
        "reconstruction_quality": {"explained_variance": 1 - fvu, "mse": acc["err2"] / (n * d), "cossim": acc["cos"] / n},
        "shrinkage": {
            "l2_norm_in": acc["nin"] / n,
            "l2_norm_out": acc["nout"] / n,
            "l2_ratio": acc["ratio"] / n,
            "relative_reconstruction_bias": acc["xh2"] / acc["dot"],
        },
        "sparsity": {"l0": acc["l0"] / n, "l1": acc["l1"] / n, "cap": k, "truncated_frac": acc["trunc"] / n},
        "latents": {
            "fvu": fvu,
            "frac_alive": float(np.mean(counts > 0)),
            "dead_frac": float(np.mean(counts == 0)),
            "dense_frac": float(np.mean(density > 0.1)),
            "freq_over_1_percent": float(np.mean(density > 0.01)),
            "freq_over_10_percent": float(np.mean(density > 0.1)),
            "density_log10_hist": {"edges": hist_edges.tolist(), "counts": hist.tolist(), "never_fired": int(np.sum(counts == 0))},
        },
        "token_stats": {"total_tokens_eval_sparsity_variance": int(n)},
        "_density": density,
    }


def pad_width(p: dict, width: int) -> dict:
    """Pad a dictionary to `width` latents that never fire (b_enc -1e30, zero rows), so members of
    one hook with different widths share one compiled forward."""
    extra = width - p["W_enc"].shape[1]
    if extra == 0:
        return p
    out = {
        "W_enc": np.pad(p["W_enc"], ((0, 0), (0, extra))),
        "b_enc": np.pad(p["b_enc"], (0, extra), constant_values=-1e30),
        "W_dec": np.pad(p["W_dec"], ((0, extra), (0, 0))),
        "b_dec": p["b_dec"],
    }
    if "threshold" in p:
        out["threshold"] = np.pad(p["threshold"], (0, extra), constant_values=1e30)
    return out


def splice_fn(lm, hook, k_max: int, outlier_ratio: float, kind: str = "topk"):
    """jit(p, k, tokens) -> per-position (nll clean, nll sae, nll ablation, kl sae, kl ablation,
    spliced mask). One compilation per hook and padded width: k (<= k_max) is an argument."""
    from flax import nnx

    graphdef, state = nnx.split(lm.model)
    special = lm.special_ids

    @jax.jit
    def run(state, p, k, tokens):
        model = nnx.merge(graphdef, state)
        logits, acts = model(tokens, (hook,))
        mask = splice_mask(tokens, acts[hook.name], special, outlier_ratio)

        def sae(a):
            flat = a.reshape(-1, a.shape[-1])
            v, i = folded.encode(p, flat, k_max, kind)
            v = v * (jnp.arange(k_max) < k)  # topk: this member's k of the hook's largest; capped kinds: the cap
            return jnp.where(mask[..., None], folded.decode(p, v, i).reshape(a.shape).astype(a.dtype), a)

        def ablate(a):
            return jnp.where(mask[..., None], jnp.zeros_like(a), a)

        lp_clean = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        tgt = tokens[:, 1:, None]
        outs = [-jnp.take_along_axis(lp_clean, tgt, -1)[..., 0]]
        kls = []
        for fn in (sae, ablate):
            lg, _ = model(tokens, edits={hook: fn})
            lp = jax.nn.log_softmax(lg[:, :-1].astype(jnp.float32), -1)
            outs.append(-jnp.take_along_axis(lp, tgt, -1)[..., 0])
            kls.append(jnp.sum(jnp.exp(lp_clean) * (lp_clean - lp), -1))
        return (*outs, *kls, mask)

    return partial(run, state)


def downstream_metrics(
    lm, p: dict, hook_name: str, k: int, ctx: np.ndarray, batch_size: int, outlier_ratio: float, fn=None, kind: str = "topk"
) -> dict:
    """Losses with dictionary `p` (top `k`, or capped at `k`) spliced in at `hook_name` (`fn`: a `splice_fn` to reuse)."""
    fn = fn or splice_fn(lm, parse_hook(hook_name, lm.cfg.n_layers), k, outlier_ratio, kind)
    pj = {key: jnp.asarray(v) for key, v in p.items()}
    sums = np.zeros(5)
    n_pred, n_spliced, n_kept_positions = 0, 0, 0
    for s in range(0, len(ctx), batch_size):
        tok = ctx[s : s + batch_size]
        m = len(tok)
        if m < batch_size:  # one compiled shape: pad with repeats, count only the real rows
            tok = np.concatenate([tok, np.repeat(tok[-1:], batch_size - m, 0)])
        res = [np.asarray(r[:m], np.float64) for r in fn(pj, k, jnp.asarray(tok))]
        sums += [r.sum() for r in res[:5]]
        n_pred += res[0].size
        n_spliced += int(res[5].sum())
        n_kept_positions += res[5].size
    clean, with_sae, abl, kl_sae, kl_abl = sums / n_pred
    return {
        "model_performance_preservation": {
            "ce_loss_score": (abl - with_sae) / (abl - clean),
            "ce_loss_with_ablation": abl,
            "ce_loss_with_sae": with_sae,
            "ce_loss_without_sae": clean,
        },
        "model_behavior_preservation": {
            "kl_div_score": (kl_abl - kl_sae) / kl_abl,
            "kl_div_with_ablation": kl_abl,
            "kl_div_with_sae": kl_sae,
        },
        "token_stats": {"total_tokens_eval_reconstruction": int(n_pred), "spliced_positions": n_spliced, "positions": n_kept_positions},
    }


def _no_model(run, model_path) -> str | None:
    """Why the downstream metrics (the dictionary spliced into the model) cannot run, or None."""
    from sae_jax.model.hooks import transformer_hook

    if why := missing_model(run.store_meta, model_path):
        return why
    for mem in run.members:
        if transformer_hook(mem.hook) is None:
            return f"hook {mem.hook!r} is not a transformer hook the zoo can splice"
    return None


def evaluate(
    run_dir,
    *,
    step=None,
    member=None,
    store=None,
    tokens=200_000,
    contexts=64,
    split="heldout",
    batch_size=8,
    text=None,
    model_path=None,
    log=print,
) -> dict:
    from sae_jax.data.store import open_store
    from sae_jax.foreign import open_dictionaries

    if tokens < 1 or contexts < 1 or batch_size < 1:
        raise EvalError("--tokens, --contexts and --batch-size must be positive")
    run, store = open_dictionaries(run_dir, step, store)  # a sae-jax run, or a SAELens / sparsify folder on `store`
    run.refuse_transcoders("eval")
    st = open_store(store or run.store_meta["root"])
    # what the names and the store say is checked before any weight is read
    names = [mem.name for mem in run.members]
    if member is not None and member not in names:
        raise EvalError(f"{run.root}: no bank member {member!r} (members: {', '.join(names)})")
    _same_model(run, st)
    skipped = _no_model(run, model_path)
    lm = None if skipped else load_run_model(run.store_meta, model_path)
    t0 = time.perf_counter()
    ctx = None if skipped else text_contexts(run.store_meta, lm, contexts, split, text)
    report = {
        "run": str(run.root.absolute()),
        "step": run.step,
        "finished": run.finished,
        "source": run.meta["kind"] if run.meta["kind"] in ("saelens", "sparsify") else "sae_jax",
        "model": (run.store_meta.get("model") or {}).get("name", "external"),
        "downstream_text": None if skipped else {"split": split, "text": text, "contexts": int(len(ctx)), "ctx_len": int(ctx.shape[1])},
        "downstream_skipped": skipped,
        "members": {},
    }
    chosen = [m for m, mem in enumerate(run.members) if member in (None, mem.name)]
    outlier = float(run.store_meta.get("outlier_ratio") or 0)
    rows_cache, fns = {}, {}
    for m in chosen:
        mem = run.members[m]
        group = [j for j in chosen if run.members[j].hook == mem.hook]
        if mem.hook not in rows_cache:
            rows_cache[mem.hook] = heldout_rows(run, st, mem.hook, tokens)
            k_max = max(run.eval_k(j) for j in group)
            w_max = max(run.members[j].width for j in group)
            fns[mem.hook] = (
                None if skipped else splice_fn(lm, parse_hook(mem.hook, lm.cfg.n_layers), k_max, outlier, mem.inference),
                w_max,
            )
        x, where = rows_cache[mem.hook]
        fn, w_max = fns[mem.hook]
        p = run.folded(m)
        k = run.eval_k(m)
        rec = reconstruction_metrics(p, x, k, mem.inference)
        rec.pop("_density")
        down = (
            {"token_stats": {}}
            if skipped
            else downstream_metrics(lm, pad_width(p, w_max), mem.hook, k, ctx, batch_size, outlier, fn=fn, kind=mem.inference)
        )
        tok_stats = {**rec.pop("token_stats"), **down.pop("token_stats")}
        report["members"][mem.name] = {
            "hook": mem.hook,
            "width": mem.width,
            "architecture": mem.architecture,
            "k": mem.k,
            "rows_from": where,
            **down,
            **rec,
            "token_stats": tok_stats,
        }
        log(f"evaluated {mem.name}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def markdown(report: dict) -> str:
    down = report["downstream_text"]
    lines = [
        f"# Evaluation of {report['run']} "
        + (
            f"({ {'saelens': 'SAELens', 'sparsify': 'sparsify'}[report['source']] } dictionaries, {len(report['members'])})"
            if report.get("source", "sae_jax") != "sae_jax"
            else f"(step {report['step']}{'' if report['finished'] else ', unfinished'})"
        ),
        "",
        f"Model {report['model']}; downstream on {down['contexts']} held-out contexts of {down['ctx_len']} tokens."
        if down
        else f"Model {report['model']}; downstream metrics skipped: {report['downstream_skipped']}.",
        "",
        "| member | FVU | expl. var | cos | L0 | dead % | CE clean | CE sae | CE zero | loss recovered | KL sae |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["members"].items():
        q, lat = r["reconstruction_quality"], r["latents"]
        if "model_performance_preservation" in r:
            ce, kl = r["model_performance_preservation"], r["model_behavior_preservation"]
            after = (
                f"{ce['ce_loss_without_sae']:.4f} | {ce['ce_loss_with_sae']:.4f} | "
                f"{ce['ce_loss_with_ablation']:.4f} | {ce['ce_loss_score']:.4f} | {kl['kl_div_with_sae']:.4f} |"
            )
        else:
            after = "n/a | n/a | n/a | n/a | n/a |"
        lines.append(
            f"| {name} | {lat['fvu']:.4f} | {q['explained_variance']:.4f} | {q['cossim']:.4f} | {r['sparsity']['l0']:.1f} | "
            f"{100 * lat['dead_frac']:.1f} | " + after
        )
    lines += ["", "Rows: " + "; ".join(sorted({r["rows_from"] for r in report["members"].values()}))]
    return "\n".join(lines)


def write_report(report: dict, out=None) -> tuple[str, list[Path]]:
    out = Path(out or Path(report["run"]) / "eval")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"cannot write the report to {out}: {e}") from None
    text = markdown(report)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    (out / "eval.md").write_text(text + "\n")
    return text, [out / "eval.json", out / "eval.md"]


def _same_model(run, st) -> None:
    """A store named for evaluation holds the activations of the run's model: the same digest
    where both record one (a store of another model would score the dictionaries on the wrong
    activations)."""
    mine = (run.store_meta.get("model") or {}).get("digest")
    theirs = (st.manifest.get("model") or {}).get("digest")
    if mine and theirs and mine != theirs:
        name = lambda m: (m.get("model") or {}).get("name", "?")  # noqa: E731
        raise EvalError(
            f"{st.root}: a store of model {name(st.manifest)!r} (digest {theirs[:12]}), but {run.root} was trained on "
            f"{name(run.store_meta)!r} (digest {mine[:12]}): evaluate on a store of the same model"
        )


def heldout_density(run, m: int, max_rows: int = 65536) -> tuple[np.ndarray | None, str]:
    """Member m's firing frequency per latent on the run's held-out store rows (at most
    `max_rows`), and where they came from; (None, why) when its store or held-out rows are gone."""
    from sae_jax.data.store import StoreError, open_store

    mem = run.members[m]
    if mem.transcoder:
        return None, "transcoder: no sparsity file"
    try:
        store = open_store(run.store_meta["root"])
        x, where = heldout_rows(run, store, mem.hook, max_rows)
    except (StoreError, EvalError) as e:
        return None, f"no held-out rows ({e})"
    return reconstruction_metrics(run.folded(m), x, run.eval_k(m), mem.inference)["_density"], where
