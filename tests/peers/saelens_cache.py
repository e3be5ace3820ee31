"""Runs in the peer venv (SAELens): write and read activation caches with SAELens's own code.

    python saelens_cache.py make DIR HOOK CONTEXT D_IN N_SEQ SEED   # a cache written by CacheActivationsRunner._create_shard
    python saelens_cache.py read DIR HOOK CONTEXT D_IN BATCH OUT.npz  # read by ActivationsStore's cached-activation path

`make` saves the arrays it wrote to DIR.npz (acts [N_SEQ, CONTEXT, D_IN], token_ids) for the test
to compare; `read` loads batches of BATCH contexts until the epoch ends and saves them to OUT.npz.
"""

import sys
from types import SimpleNamespace

import numpy as np
import torch
from datasets import Array2D, Features, Sequence, Value
from sae_lens.cache_activations_runner import CacheActivationsRunner
from sae_lens.training.activations_store import ActivationsStore


def make(path, hook, ctx, d_in, n, seed):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n * ctx, d_in, generator=g) * 3 + 1
    ids = torch.randint(0, 5000, (n * ctx,), generator=g)
    features = Features({hook: Array2D(shape=(ctx, d_in), dtype="float32"), "token_ids": Sequence(Value(dtype="int32"), length=ctx)})
    runner = SimpleNamespace(cfg=SimpleNamespace(hook_name=hook, n_seq_in_buffer=n, d_in=d_in), context_size=ctx, features=features)
    shard = CacheActivationsRunner._create_shard(runner, (acts, ids))
    shard.save_to_disk(path)
    np.savez(path + ".npz", acts=acts.numpy().reshape(n, ctx, d_in), token_ids=ids.numpy().reshape(n, ctx))


def read(path, hook, ctx, d_in, batch, out):
    s = SimpleNamespace(cached_activations_path=path, hook_name=hook, device="cpu", dtype=torch.float32, context_size=ctx, d_in=d_in)
    s.store_batch_size_prompts = batch
    s.cached_activation_dataset = ActivationsStore.load_cached_activation_dataset(s)
    acts, ids = [], []
    while True:
        try:
            a, t = ActivationsStore._load_raw_llm_batch_from_cached(s, raise_on_epoch_end=True)
        except StopIteration:
            break
        acts.append(a.numpy())
        ids.append(t.numpy())
    np.savez(out, acts=np.concatenate(acts), token_ids=np.concatenate(ids))


if __name__ == "__main__":
    cmd, path, hook, ctx, d_in, n = sys.argv[1:7]
    if cmd == "make":
        make(path, hook, int(ctx), int(d_in), int(n), int(sys.argv[7]))
    else:
        read(path, hook, int(ctx), int(d_in), int(n), sys.argv[7])
