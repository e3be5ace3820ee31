"""Grain loading from a store: determinism, alignment across hooks, data-parallel split, state."""

import numpy as np
import pytest

from sae_jax.data.loader import activation_dataset, iterator
from sae_jax.data.store import StoreError

H0, H1 = "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"


def _key(batch):
    return [tuple(r) for r in batch["tokens"][:, 1:]]


def test_batches_and_alignment(tiny_store):
    ds = activation_dataset(tiny_store, [H0, H1], 256, seed=3, with_tokens=True, num_epochs=1)
    batches = list(iterator(ds))
    n_rec = tiny_store.n_records
    assert len(batches) == n_rec // 2
    b = batches[0]
    assert b[H0].shape == (256, 576) and b[H1].shape == (256, 576) and b[H0].dtype.name == "bfloat16"
    # the same tokens for both hooks: compare with a direct read of the records
    toks, a0, a1 = (tiny_store.read_all(p) for p in ("tokens", H0, H1))
    index = {tuple(t[1:]): i for i, t in enumerate(toks)}
    rows = [index[k] for k in _key(b)]
    np.testing.assert_array_equal(b[H0].view(np.uint16), a0[rows].view(np.uint16))
    np.testing.assert_array_equal(b[H1].view(np.uint16), a1[rows].view(np.uint16))
    # one epoch sees every row once (up to the dropped last partial batch)
    seen = [k for b in batches for k in _key(b)]
    assert len(seen) == len(set(seen)) == (n_rec // 2) * 256


def test_seeded_and_reshuffled_each_epoch(tiny_store):
    mk = lambda seed: activation_dataset(tiny_store, [H0], 256, seed=seed, with_tokens=True)  # noqa: E731
    a, b, c = iterator(mk(0)), iterator(mk(0)), iterator(mk(1))
    per_epoch = tiny_store.n_records // 2
    ea = [_key(next(a)) for _ in range(2 * per_epoch)]
    eb = [_key(next(b)) for _ in range(2 * per_epoch)]
    ec = [_key(next(c)) for _ in range(per_epoch)]
    assert ea == eb
    assert ea[:per_epoch] != ec
    assert ea[:per_epoch] != ea[per_epoch:]


def test_reads_only_the_requested_hook(tiny_store, monkeypatch):
    import grain

    from sae_jax.data import loader

    opened = []

    class Spy(grain.sources.ArrayRecordDataSource):
        def __init__(self, paths, *a, **k):
            opened.extend(str(p) for p in paths)
            super().__init__(paths, *a, **k)

    monkeypatch.setattr(loader.grain.sources, "ArrayRecordDataSource", Spy)
    it = iterator(activation_dataset(tiny_store, [H0], 256, seed=0))
    assert set(next(it)) == {H0}
    assert opened and all(f".{H0}.array_record" in p for p in opened)


def test_data_parallel_groups_are_disjoint_and_cover(tiny_store):
    keys = []
    for g in range(2):
        ds = activation_dataset(tiny_store, [H0], 128, seed=5, shard_index=g, shard_count=2, num_epochs=1, with_tokens=True)
        keys.append({k for b in iterator(ds) for k in _key(b)})
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == tiny_store.n_rows


def test_state_restores_the_next_batch(tiny_store):
    ds = activation_dataset(tiny_store, [H0, H1], 256, seed=7, with_tokens=True)
    it = iterator(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = iterator(ds)
    it2.set_state(state)
    got = [next(it2) for _ in range(3)]
    for w, g in zip(want, got):
        for k in w:
            np.testing.assert_array_equal(w[k].view(np.uint8), g[k].view(np.uint8))


def test_bad_requests(tiny_store):
    with pytest.raises(StoreError, match="hook 'blocks.9.hook_mlp_out' is not in this store"):
        activation_dataset(tiny_store, ["blocks.9.hook_mlp_out"], 256)
    with pytest.raises(StoreError, match=r"batch size 200 is not a multiple of the store's rows per record \(128"):
        activation_dataset(tiny_store, [H0], 200)
    with pytest.raises(StoreError, match="leave fewer than one batch"):
        activation_dataset(tiny_store, [H0], 128, shard_count=tiny_store.n_records + 1, shard_index=0)


def test_record_range_for_held_out_splits(tiny_store):
    r = tiny_store.rows_per_record
    toks = tiny_store.read_all("tokens")
    held = {tuple(t[1:]) for t in toks[-4 * r :]}
    n = tiny_store.n_records
    ds = activation_dataset(tiny_store, [H0], 2 * r, seed=0, records=(n - 4, n), num_epochs=1, with_tokens=True)
    seen = {k for b in iterator(ds) for k in _key(b)}
    assert seen == held


@pytest.mark.parametrize("groups", [2, 4])
def test_global_batch_does_not_depend_on_the_group_count(tiny_store, groups):
    """Multi-process training: the groups' batches, concatenated in group order, are the batch one
    reader of the whole global batch gets at the same step, across epoch boundaries too."""
    r = tiny_store.rows_per_record
    steps = 2 * (tiny_store.n_records // groups) + 3  # past the second epoch boundary
    one = iterator(activation_dataset(tiny_store, [H0], groups * r, seed=11, with_tokens=True), num_threads=0)
    parts = [
        iterator(activation_dataset(tiny_store, [H0], r, seed=11, shard_index=g, shard_count=groups, with_tokens=True), num_threads=0)
        for g in range(groups)
    ]
    for _ in range(steps):
        want = next(one)
        got = [next(p) for p in parts]
        for k in want:
            np.testing.assert_array_equal(want[k].view(np.uint8), np.concatenate([g[k] for g in got]).view(np.uint8))
