"""Several processes tokenize the text once between them: the contexts read back from the token
blocks are the streaming pipeline's, whatever the process count, window or target."""

import itertools
import threading

import numpy as np
import pytest

from sae_jax.data import token_cache as tc
from sae_jax.data.contexts import EmptyCorpusError, contexts
from sae_jax.data.text import documents


def _shared(tmp_path, lm, n_proc, ctx_len, window, n_target, docs=None, monkeypatch=None):
    """Run `tokenize_share` as `n_proc` threads meeting at a barrier, as processes would."""
    body = ctx_len - 1
    needed = tc.contexts_needed(n_target, window) * body
    barrier = threading.Barrier(n_proc)
    results, errors = {}, []

    def run(me):
        try:
            src = documents("embedded") if docs is None else iter(docs)
            results[me] = tc.tokenize_share(
                src, lm.tokenizer, lm.eos_id, tmp_path / ".tokens", me, n_proc, needed, lambda _: barrier.wait()
            )
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_proc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert all(results[i] == results[0] for i in results)  # every process sees the same blocks
    return tc.CachedContexts(tmp_path / ".tokens", results[0], ctx_len, lm.bos_id, window, 7, n_target)


@pytest.mark.parametrize("n_proc,ctx_len,window,n_target", [(1, 64, 64, 300), (3, 64, 64, 300), (4, 128, 1, 200), (2, 64, 500, 1500)])
def test_cached_contexts_are_the_stream(tmp_path, lm, monkeypatch, n_proc, ctx_len, window, n_target):
    monkeypatch.setattr(tc, "BLOCK_DOCS", 16)  # many blocks over the embedded corpus's chapters
    want = list(itertools.islice(contexts(documents("embedded"), lm.tokenizer, ctx_len, lm.bos_id, lm.eos_id, window, 7), n_target))
    got = _shared(tmp_path, lm, n_proc, ctx_len, window, n_target)
    assert got.n == len(want) == n_target
    cut = n_target // 3  # any range reads alone
    for lo, hi in ((0, n_target), (cut, cut + 17), (n_target - 5, n_target + 10)):
        np.testing.assert_array_equal(np.stack(got.get(lo, hi)), np.stack(want[lo:hi]))
    # only blocks up to what the target needs were tokenized (a round of n_proc blocks past it at most)
    lengths = [p.stat().st_size // 4 for p in sorted((tmp_path / ".tokens").glob("block-*.bin"))]
    assert sum(lengths[:-n_proc]) < tc.contexts_needed(n_target, window) * (ctx_len - 1)


def test_a_text_that_runs_out(tmp_path, lm, monkeypatch):
    """Fewer contexts than the target: the last window is partial, as in the stream."""
    monkeypatch.setattr(tc, "BLOCK_DOCS", 4)
    docs = list(itertools.islice(documents("embedded"), 30))
    want = list(contexts(iter(docs), lm.tokenizer, 64, lm.bos_id, lm.eos_id, 100, 7))
    got = _shared(tmp_path, lm, 3, 64, 100, 10_000, docs=docs)
    assert got.n == len(want) < 10_000
    np.testing.assert_array_equal(np.stack(got.get(0, 10_000)), np.stack(want))
    with pytest.raises(EmptyCorpusError):
        _shared(tmp_path / "e", lm, 2, 64, 100, 10, docs=["a few words"])
