"""Batches of activations from a store, with Grain.

    ds = activation_dataset(store, ["blocks.12.hook_resid_post"], batch_size=4096, seed=0)
    it = iter(ds)                 # a grain DatasetIterator
    batch = next(it)              # {"blocks.12.hook_resid_post": bfloat16 [4096, 576]}
    state = it.get_state()        # checkpoint this beside the train state ...
    it.set_state(state)           # ... and the next batch is the same again

Pipeline: step index -> record id (a seeded global permutation per epoch, dealt across
data-parallel groups) -> read that record of each requested hook's files (and of nothing
else) -> `batch_size / rows_per_record` records per batch. Every hook in a batch holds
the same tokens because record i of every hook file holds the same rows.
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from sae_jax.data.store import Store, StoreError, open_store


class _ReadRecord:
    """Record index -> {part: array [R, width]} for the requested parts only."""

    def __init__(self, store: Store, parts: list[str]):
        self.store = store
        self.sources = {p: grain.sources.ArrayRecordDataSource([str(f) for f in store.files(p)]) for p in parts}

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return {p: self.store.decode(p, src[index]) for p, src in self.sources.items()}


class _RecordOrder:
    """Group-local record index -> record id, such that the global batch does not depend on how
    many data-parallel groups read it.

    Epoch e is `default_rng([seed, e]).permutation(n)`, cut into `n // (G * b)` global batches of
    `G * b` records (the remainder is dropped, a different one each epoch). Group g of G reads
    records `[g * b, (g + 1) * b)` of each global batch, so the groups' batches, concatenated in
    group order, are the batch a single reader (G = 1, batch `G * b` records) gets at that step:
    a run on one process and the same run on several read the same rows in the same order. Pure
    in (i, seed, g, G): an iterator restored at step i continues exactly. (Grain's own `shuffle`
    computes each index with a Feistel network, which cost half of the loader's time:
    docs/benchmarks.md, "Figures moved out of the code".)
    """

    def __init__(self, lo: int, n: int, seed: int, group: int, groups: int, per_batch: int):
        self.lo, self.n, self.seed, self.group, self.groups, self.per_batch = lo, n, seed, group, groups, per_batch
        self.steps_per_epoch = n // (groups * per_batch)
        self.per_group = self.steps_per_epoch * per_batch  # records this group reads per epoch
        self._epoch, self._perm = -1, None

    def __call__(self, i: int, _=None) -> int:
        step, j = divmod(i, self.per_batch)
        epoch, s = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self.lo + int(self._perm[(s * self.groups + self.group) * self.per_batch + j])

    def __getstate__(self):  # the cached permutation is not worth pickling to workers
        return {**self.__dict__, "_epoch": -1, "_perm": None}


def _concat(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # grain's batch stacks records: [n, R, width] -> [n * R, width]
    return {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}


def activation_dataset(
    store: Store | str | Path,
    hooks: list[str],
    batch_size: int,
    seed: int = 0,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    with_tokens: bool = False,
    records: tuple[int, int] | None = None,
) -> grain.MapDataset:
    """A `grain.MapDataset` of batches `{hook: [batch_size, width]}` (see the module docstring).

    `shard_index/shard_count` select this data-parallel group's share of records: `batch_size`
    is the group's (local) batch, the global batch is `shard_count * batch_size` rows and the same
    rows in the same order whatever the count (see `_RecordOrder`);
    `records=(start, stop)` restricts to a contiguous record range (held-out splits);
    `num_epochs=None` repeats forever (each epoch shuffled differently).
    """
    if not isinstance(store, Store):
        store = open_store(store)
    if not hooks:
        raise StoreError("no hooks requested from the store")
    for h in hooks:
        store.check_hook(h)
    r = store.rows_per_record
    if batch_size % r:
        raise StoreError(f"batch size {batch_size} is not a multiple of the store's rows per record ({r}, from {store.root}/manifest.json)")
    if not 0 <= shard_index < shard_count:
        raise StoreError(f"data shard {shard_index} of {shard_count} does not exist")
    lo, hi = records if records is not None else (0, store.n_records)
    if not 0 <= lo < hi <= store.n_records:
        raise StoreError(f"record range {lo}..{hi} is outside the store's {store.n_records} records ({store.root})")
    n = hi - lo
    per_batch = batch_size // r
    if n < shard_count * per_batch:
        raise StoreError(
            f"{store.root}: {n} records of {r} rows (records {lo}..{hi}) split over {shard_count} data-parallel group(s) "
            f"leave fewer than one batch of {batch_size} rows per group ({shard_count * batch_size} rows per step in all)"
        )
    parts = list(hooks) + (["tokens"] if with_tokens else [])
    order = _RecordOrder(lo, n, seed, shard_index, shard_count, per_batch)
    ds = grain.MapDataset.range(order.per_group).repeat(num_epochs).map_with_index(order)
    ds = ds.map(_ReadRecord(store, parts))
    return ds.batch(per_batch, drop_remainder=True).map(_concat)


def iterator(ds: grain.MapDataset, num_threads: int = 4, prefetch: int = 8, workers: int = 0):
    """A checkpointable iterator: threads (default) or worker processes (`workers > 0`)."""
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(ids)
