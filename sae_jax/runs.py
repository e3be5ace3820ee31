"""A trained run, opened for eval and export: its bank, its store's identity, its parameters.

`open_run(RUN)` reads `bank.json` (written by `train`) and the latest committed Orbax checkpoint
(or the one asked for) and returns every member's dictionary *folded to raw activations*:

    training sees x_s = s * x (s = 1 / sqrt(mean squared norm of the hook, from the manifest))
    pre = (x_s - b_dec) @ W_enc + b_enc;  x_hat_s = topk(pre) @ W_dec + b_dec;  x_hat = x_hat_s / s

is the same map as, on raw x,

    pre' = (x - b_dec / s) @ W_enc + b_enc / s = pre / s;   x_hat = topk(pre') @ W_dec + b_dec / s

so the folded dictionary keeps W_enc and the unit-norm decoder rows and divides the biases by s;
its activations are the trained ones divided by s (the same latents win: s > 0), in the units of
the raw activations. Nothing here unpickles: JSON and Orbax's array format only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class RunError(RuntimeError):
    """A run directory that cannot be evaluated or exported; the message names the file."""


@dataclass(frozen=True)
class Member:
    name: str
    hook: str
    width: int
    k: int
    input_scale: float
    architecture: str = "topk"


@dataclass
class Run:
    root: Path
    meta: dict  # bank.json
    config: dict  # the resolved config the run was trained with
    step: int
    steps: int  # the run's planned steps
    members: list[Member]
    params: dict = field(repr=False)  # raw (unfolded) bank params, numpy float32 [M, ...]

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    @property
    def store_meta(self) -> dict:
        return self.meta["store"]

    def folded(self, m: int) -> dict[str, np.ndarray]:
        """Member m's dictionary on raw activations: W_enc [d_in, w], b_enc [w], W_dec [w, d_in], b_dec [d_in]."""
        mem = self.members[m]
        w, s = mem.width, mem.input_scale
        p = self.params
        return {
            "W_enc": np.ascontiguousarray(p["W_enc"][m][:, :w], np.float32),
            "b_enc": np.ascontiguousarray(p["b_enc"][m][:w] / s, np.float32),
            "W_dec": np.ascontiguousarray(p["W_dec"][m][:w], np.float32),
            "b_dec": np.ascontiguousarray(p["b_dec"][m] / s, np.float32),
        }


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
    n, width, d_in = params["W_dec"].shape
    if n != len(members) or d_in != meta["d_in"] or width != meta["width"]:
        raise RunError(
            f"{root}: checkpoint step {step} holds W_dec {params['W_dec'].shape}; bank.json describes {len(members)} x {meta['width']} x {meta['d_in']}"
        )
    steps = int(cfg.get("config", {}).get("train", {}).get("steps", step))
    return Run(root, meta, cfg.get("config", {}), int(step), steps, members, params)
