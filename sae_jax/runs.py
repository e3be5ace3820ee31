"""A trained run, opened for eval and export: its bank, its store's identity, its parameters.

`open_run(RUN)` reads `bank.json` (written by `train`) and the latest committed Orbax checkpoint
(or the one asked for) and returns every member's dictionary *folded to raw activations*:

    training sees x_s = s * x (s = 1 / sqrt(mean squared norm of the hook, from the manifest))
    pre = (x_s - b_dec) @ W_enc + b_enc;  x_hat_s = topk(pre) @ W_dec + b_dec;  x_hat = x_hat_s / s

is the same map as, on raw x,

    pre' = (x - b_dec / s) @ W_enc + b_enc / s = pre / s;   x_hat = topk(pre') @ W_dec + b_dec / s

so the folded dictionary keeps W_enc and the unit-norm decoder rows and divides the biases by s;
its activations are the trained ones divided by s (the same latents win: s > 0), in the units of
the raw activations. In general (transcoders read hook A, scale s_in, and write hook B, scale
s_out; an SAE has s_in = s_out = s): W_enc * s_in / s_out, b_enc / s_out, thresholds / s_out,
W_dec kept, b_dec / s_out, W_skip * s_in / s_out. Every activation function here (TopK, ReLU,
JumpReLU with its threshold scaled alike) commutes with a positive scale, so the same latents win.
Nothing here unpickles: JSON and Orbax's array format only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from sae_jax.errors import SaeJaxError


class RunError(SaeJaxError, RuntimeError):
    """A run directory that cannot be evaluated or exported; the message names the file."""


@dataclass(frozen=True)
class Member:
    name: str
    hook: str
    width: int
    k: int
    input_scale: float
    architecture: str = "topk"  # as trained: topk | batchtopk | jumprelu | relu
    coef: float | None = None  # relu: L1, jumprelu: L0 coefficient
    out_hook: str | None = None  # transcoders: the hook it writes
    output_scale: float | None = None

    @property
    def transcoder(self) -> bool:
        return self.out_hook is not None

    @property
    def target(self) -> str:
        return self.out_hook or self.hook

    @property
    def inference(self) -> str:
        """The activation function at inference: topk, jumprelu (BatchTopK's threshold) or relu."""
        return "jumprelu" if self.architecture == "batchtopk" else self.architecture


@dataclass
class Run:
    root: Path
    meta: dict  # bank.json
    config: dict  # the resolved config the run was trained with
    step: int
    steps: int  # the run's planned steps
    members: list[Member]
    params: dict = field(repr=False)  # raw (unfolded) bank params, numpy float32 [M, ...]
    thresholds: np.ndarray | None = field(default=None, repr=False)  # [M, width] scaled units (JumpReLU, BatchTopK)

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    @property
    def store_meta(self) -> dict:
        return self.meta["store"]

    def folded(self, m: int) -> dict[str, np.ndarray]:
        """Member m's dictionary on raw activations: W_enc [d_in, w], b_enc [w], W_dec [w, d_out],
        b_dec [d_out]; `threshold [w]` (JumpReLU and BatchTopK), `W_skip [d_in, d_out]` (skip transcoders)."""
        mem = self.members[m]
        w, s_in = mem.width, mem.input_scale
        s_out = mem.output_scale or s_in
        p = self.params
        f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
        out = {
            "W_enc": f32(p["W_enc"][m][:, :w] * (s_in / s_out)),
            "b_enc": f32(p["b_enc"][m][:w] / s_out),
            "W_dec": f32(p["W_dec"][m][:w]),
            "b_dec": f32(p["b_dec"][m] / s_out),
        }
        if self.thresholds is not None:
            out["threshold"] = f32(self.thresholds[m][:w] / s_out)
        if "W_skip" in p:
            out["W_skip"] = f32(p["W_skip"][m] * (s_in / s_out))
        return out

    def eval_k(self, m: int) -> int:
        """Activations per row kept by eval and the atlas: k for TopK; for the thresholded and ReLU
        dictionaries a cap (`sae.folded`): BatchTopK's training cap, else 4x the member's last
        training L0 (at least 64), at most the width."""
        mem = self.members[m]
        if mem.inference == "topk":
            return mem.k
        if mem.architecture == "batchtopk" and self.meta.get("batchtopk_cap"):
            return min(mem.width, int(self.meta["batchtopk_cap"]))
        return int(min(mem.width, max(64, 4 * int(np.ceil(self._last_l0[m])))))

    @cached_property
    def _last_l0(self) -> np.ndarray:
        """Each member's L0 at the last logged training step (zeros if none was logged); read once."""
        metrics = self.root / "metrics.jsonl"
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
        last = json.loads(lines[-1]).get("l0") if lines else None
        return np.zeros(len(self.members)) if last is None else np.atleast_1d(np.asarray(last, np.float64))

    def refuse_transcoders(self, job: str) -> None:
        bad = [mem.name for mem in self.members if mem.transcoder]
        if bad:
            raise RunError(
                f"{self.root}: `sae-jax {job}` works on SAEs; this bank holds transcoders ({bad[0]}, ...). "
                "Export them (`sae-jax export`) to evaluate in SAELens or sparsify."
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path.parent}: not a sae-jax run directory ({path.name} is missing; `sae-jax train` writes it)") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


def _single_device_target(path: Path):
    """The saved tree's shapes and dtypes on this process's first device, whatever mesh (and how
    many devices) wrote it: eval and export run anywhere."""
    import jax
    import orbax.checkpoint as ocp
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a per-item metadata file is absent; the tree metadata is there
    try:
        md = ocp.StandardCheckpointer().metadata(path.absolute())
    finally:
        logging.set_verbosity(level)
    tree = getattr(md, "item_metadata", md)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)


def open_run(root, step: int | None = None) -> Run:
    """Open a run directory at its latest committed checkpoint (or `step`)."""
    import orbax.checkpoint as ocp

    root = Path(root).expanduser()
    if not root.is_dir():
        raise RunError(f"{root}: no such run directory")
    meta = _read_json(root / "bank.json")
    cfg = _read_json(root / "config.json")
    ckpt = root / "checkpoints"
    steps_done = []
    if ckpt.is_dir():
        mngr = ocp.CheckpointManager(ckpt.absolute(), item_names=("state", "data"))
        steps_done = list(mngr.all_steps())
    if not steps_done:
        raise RunError(f"{root}: no finished checkpoint in {ckpt} (train the run first; an interrupted save is never used)")
    if step is None:
        step = max(steps_done)
    elif step not in steps_done:
        raise RunError(f"{root}: no checkpoint for step {step} (have {sorted(steps_done)})")
    try:
        target = _single_device_target(ckpt / str(step) / "state")
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{ckpt / str(step)}: the checkpoint cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    finally:
        mngr.close()
    params = {k: np.asarray(v, np.float32) for k, v in state["params"].items()}
    members = [Member(**m) for m in meta["members"]]
    n, width, d_out = params["W_dec"].shape
    if n != len(members) or d_out != meta.get("d_out", meta["d_in"]) or width != meta["width"]:
        raise RunError(
            f"{root}: checkpoint step {step} holds W_dec {params['W_dec'].shape}; bank.json describes "
            f"{len(members)} x {meta['width']} x {meta.get('d_out', meta['d_in'])}"
        )
    thresholds = None
    if "threshold" in params:
        thresholds = params.pop("threshold")
    elif "threshold_ema" in state:  # BatchTopK: the bias-corrected running batch threshold, one per member
        from sae_jax.sae.bank import batchtopk_threshold

        thr = batchtopk_threshold(state["threshold_ema"], state["threshold_norm"])
        thresholds = np.repeat(thr[:, None], width, axis=1).astype(np.float32)
    steps = int(cfg.get("config", {}).get("train", {}).get("steps", step))
    return Run(root, meta, cfg.get("config", {}), int(step), steps, members, params, thresholds)
