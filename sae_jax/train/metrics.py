"""The run's metric writer: `metrics.jsonl`, TensorBoard and the progress bar, on process 0 only.

The loop calls `tick()` once per step (the bar) and `log(step, metrics, state)` once per log
step: only then do metrics leave the devices (`host`), so the other steps carry no host-device
sync. On processes other than 0 `log` still gathers (a collective every process must join) and
returns the record, but writes nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils


def host(x) -> np.ndarray:
    """A device array on the host: its local copy where it is replicated or local, else gathered
    from every process (a collective: every process calls it at the same point)."""
    if isinstance(x, np.ndarray | np.generic):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class MetricsWriter:
    def __init__(self, run: Path, names: list[str], *, steps: int, start: int, batch_size: int, progress: bool):
        from tqdm import tqdm

        self.main = jax.process_index() == 0
        self.names, self.batch_size = names, batch_size
        self.bar = tqdm(
            total=steps, initial=start, unit="step", desc="train", disable=not (progress and self.main), file=sys.stderr, dynamic_ncols=True
        )
        self.file = open(Path(run) / "metrics.jsonl", "a") if self.main else None  # noqa: SIM115  (closed in close())
        if self.main:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run) / "tb"))
        self.t0, self.step0 = time.perf_counter(), start
        self.last: dict | None = None

    def tick(self) -> None:
        self.bar.update(1)

    def log(self, step: int, metrics: dict, state: dict) -> dict:
        """One record: the step's metrics [M] per member, tokens/s since the last record, NaN counts."""
        values = {k: host(v).tolist() for k, v in metrics.items()}  # waits for the step: the clock reads after it
        values["nan_skips"] = int(host(state["nan_skips"]))
        values["nan_streak"] = int(host(state["nan_streak"]))
        dt = time.perf_counter() - self.t0
        rec = {"step": step, "tokens": step * self.batch_size, "tok_s": (step - self.step0) * self.batch_size / max(dt, 1e-9), **values}
        if self.main:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            self._tensorboard(rec)
        self.bar.set_postfix(fvu=f"{np.mean(rec['fvu']):.3f}", l0=f"{np.mean(rec['l0']):.1f}", tok_s=f"{rec['tok_s']:,.0f}")
        self.t0, self.step0, self.last = time.perf_counter(), step, rec
        return rec

    def _tensorboard(self, rec: dict) -> None:
        """Scalars as `key`, per member `key/NAME`, per Matryoshka prefix `key/NAME/P`."""
        step = rec["step"]
        for key, val in rec.items():
            if key in ("step", "finite"):
                continue
            arr = np.asarray(val, np.float64)
            if arr.ndim == 0:
                self.tb.add_scalar(key, float(arr), step)
                continue
            for j, v in enumerate(arr):
                for p, vp in enumerate(np.atleast_1d(v)):
                    self.tb.add_scalar(f"{key}/{self.names[j]}" + (f"/{p}" if arr.ndim > 1 else ""), float(vp), step)

    def close(self) -> None:
        self.bar.close()
        if self.main:
            self.tb.close()
            self.file.close()
