"""`sae-jax plot RUN`: PNG plots of a run's curves and of its latent density histogram."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sae_jax.errors import SaeJaxError

CURVES = ("fvu", "l0", "dead_frac", "auxk_loss", "tok_s")
YLABELS = {
    "fvu": "FVU (training batch)",
    "l0": "active latents per token",
    "dead_frac": "share of latents dead",
    "auxk_loss": "AuxK loss",
    "tok_s": "tokens / s",
}


class PlotError(SaeJaxError, RuntimeError):
    pass


def plot_run(run: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    mfile = run / "metrics.jsonl"
    if not mfile.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (not a training run, or no step logged yet)")
    recs = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
    names = json.loads((run / "members.json").read_text()) if (run / "members.json").is_file() else None
    steps = np.asarray([r["step"] for r in recs])
    out = []
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, key in zip(axes, CURVES):
        v = np.asarray([r[key] for r in recs], dtype=float)
        v = v.reshape(len(recs), -1)
        styles = ("-", "--", ":", "-.")
        for m in range(v.shape[1]):  # a style and a marker each, so that equal curves stay apart
            ax.plot(
                steps, v[:, m], styles[m % len(styles)], marker="os^vD<>"[m % 7], markevery=max(len(steps) // 8, 1),
                markersize=3, alpha=0.85, label=names[m] if names and v.shape[1] == len(names) else None,
            )  # fmt: skip
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(YLABELS.get(key, key))
        if key in ("fvu", "auxk_loss") and (v > 0).any():
            ax.set_yscale("log")
    if names:
        axes[0].legend(fontsize=6)
    fig.tight_layout()
    out.append(run / "curves.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    dens = run / "latent_density.npz"
    if dens.is_file():
        with np.load(dens) as z:
            d, widths = z["density"], z["widths"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for m in range(d.shape[0]):
            x = d[m, : widths[m]]
            ax.hist(np.log10(np.maximum(x, 1e-10)), bins=60, histtype="step", label=names[m] if names else None)
        ax.set_xlabel("log10 firing frequency (1e-10 = never fired)")
        ax.set_ylabel("latents")
        if names:
            ax.legend(fontsize=6)
        fig.tight_layout()
        out.append(run / "latent_density.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    return out
