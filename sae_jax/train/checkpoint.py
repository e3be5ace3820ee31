"""Checkpoints of a run: an Orbax `CheckpointManager` under `RUN/checkpoints/` with two items,
`state` (the train state pytree, restored onto the run's shardings) and `data` (each process's
Grain iterator position, `process_P-of-N.json`).

A checkpoint restores onto any mesh and any number of processes: where this process wrote no
iterator state (the run was saved by another process layout) the position follows from the
step alone, since the record order is a pure function of the step (`data/loader.py`).
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from sae_jax.errors import SaeJaxError

ITEMS = ("state", "data")


class CheckpointError(SaeJaxError, RuntimeError):
    pass


class Checkpoints:
    def __init__(self, run: Path, every: int, keep: int):
        self.root = (Path(run) / "checkpoints").absolute()
        self.mngr = ocp.CheckpointManager(
            self.root, options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every), item_names=ITEMS
        )

    def restore(self, state, it) -> tuple[dict, int]:
        """(state, step) of the latest checkpoint, `it` moved to its data position; (state, 0) if none."""
        step = self.mngr.latest_step() or 0
        if not step:
            return state, 0
        mine = self.root / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        args = {"state": ocp.args.StandardRestore(state)}
        if mine.is_file():
            args["data"] = grain.checkpoint.CheckpointRestore(it)
        state = self.mngr.restore(step, args=ocp.args.Composite(**args))["state"]
        if not mine.is_file():
            it.set_state({"next_index": step})
        elif it.get_state()["next_index"] != step:
            raise CheckpointError(f"{mine}: the data iterator is at batch {it.get_state()['next_index']}, the train state at step {step}")
        return state, step

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point: True on every process at the same step after a SIGTERM."""
        return self.mngr.reached_preemption(step)

    def save(self, step: int, state, it, force: bool = False) -> None:
        """Save (asynchronously) at the manager's interval, or now when `force`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it))
        self.mngr.save(step, args=args, force=force)

    def wait(self) -> None:
        """Block until the asynchronous saves are on disk (and raise what they raised)."""
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.close()
