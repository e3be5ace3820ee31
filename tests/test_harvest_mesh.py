"""The harvest on a device mesh: contexts over `data`, the weights tensor-parallel over `model`,
the weights streamed from safetensors into their shards; whatever the mesh, the store is the one
one device writes."""

import json

import jax
import numpy as np
import pytest
from conftest import run_cli, tiny_config
from jax.sharding import PartitionSpec as P
from random_models import write_random_llama

from sae_jax.data.store import open_store
from sae_jax.harvest import harvest
from sae_jax.model import sharding as msh
from sae_jax.model.loading import load_model
from sae_jax.parallel import make_mesh

HOOKS = "blocks.1.hook_resid_post,blocks.2.attn.hook_z"
quiet = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, lm):
    """A random Llama-shaped model whose 16 heads and 8 kv heads split 1, 2, 4 or 8 ways."""
    return write_random_llama(tmp_path_factory.mktemp("llama") / "m", lm.tokenizer, seed=1)


def _config(out, model_path, data=0, model=0, dtype="float32", model_dtype="float32"):
    c = tiny_config(out, **{"harvest.mesh_data": data, "harvest.mesh_model": model, "harvest.dtype": dtype})
    c.model.path, c.model.dtype = str(model_path), model_dtype
    c.harvest.hooks = HOOKS
    return c


def _rows(store) -> dict[str, np.ndarray]:
    return {h: store.read_all(h).astype(np.float64) for h in [*store.hooks, "tokens"]}


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.fixture(scope="module")
def one_device(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "ref"
    return harvest(_config(out, llama_dir, 1, 1), devices=jax.devices()[:1], **quiet)


def _same_store(ref, got, bound: float) -> None:
    a, b = _rows(ref), _rows(got)
    np.testing.assert_array_equal(a.pop("tokens"), b.pop("tokens"))  # the same rows, in the same order
    for h in a:
        assert a[h].shape == b[h].shape
        assert _max_rel(a[h], b[h]) <= bound, (h, _max_rel(a[h], b[h]))
    ma, mb = ref.manifest, got.manifest
    # what may differ: when, the timing, the checksums of float-different shards, float-close statistics
    assert {k for k in ma if ma[k] != mb.get(k)} <= {"created", "last_run", "shards", "hooks"}
    assert [(s["index"], s["rows"], s["contexts"]) for s in ma["shards"]] == [(s["index"], s["rows"], s["contexts"]) for s in mb["shards"]]
    for h in ma["hooks"]:
        np.testing.assert_allclose(mb["hooks"][h]["mean"], ma["hooks"][h]["mean"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data,model", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_mesh_store_equals_the_one_device_store(llama_dir, one_device, tmp_path, data, model):
    # float32: tensor parallelism sums each layer's two matmuls over `model` in another order;
    # measured 7e-7 of each hook's largest value (the bound: 1e-5)
    got = harvest(_config(tmp_path / "s", llama_dir, data, model), **quiet)
    assert got.manifest["complete"]
    _same_store(one_device, got, 1e-5)


@pytest.mark.heavy
def test_a_model_axis_past_the_kv_heads_keeps_them_whole(lm, tmp_path):
    """16 query heads over 2 kv heads split 4 and 8 ways (as Llama 3.3 70B's 8 kv heads on 16
    chips): each device keeps both kv projections, the query heads and the MLP split."""
    d = write_random_llama(tmp_path / "gqa", lm.tokenizer, seed=2, n_kv_heads=2)
    ref = harvest(_config(tmp_path / "a", d, 1, 1), devices=jax.devices()[:1], **quiet)
    for data, model in ((2, 4), (1, 8)):
        got = harvest(_config(tmp_path / f"b{model}", d, data, model), **quiet)
        _same_store(ref, got, 1e-5)
    m = load_model(str(d), mesh=make_mesh(1, 8)).model.blocks[0]
    assert m.wk[...].sharding.is_fully_replicated and m.wq[...].sharding.spec == P(None, "model")


@pytest.mark.heavy
def test_bfloat16_model_on_a_split_mesh(llama_dir, tmp_path):
    """A bf16 model computes each matmul in bf16 with float32 sums: split over `model`, the
    partial sums are rounded to bf16 before the all-reduce, so a value may move by a few bf16
    ulps (2^-8 relative each). Measured 0.0073 (1.9 ulps) of the hook's largest value; bound 4 ulps."""
    ref = harvest(_config(tmp_path / "a", llama_dir, 1, 1, model_dtype="bfloat16"), devices=jax.devices()[:1], **quiet)
    got = harvest(_config(tmp_path / "b", llama_dir, 2, 4, model_dtype="bfloat16"), **quiet)
    a, b = _rows(ref), _rows(got)
    for h in ref.hooks:
        rel = _max_rel(a[h], b[h])
        print(f"bf16 model, 2x4 vs 1x1, {h}: max |diff| / max |x| = {rel:.3g}")
        assert rel <= 4 * 2**-8, (h, rel)


@pytest.mark.heavy
def test_embedded_model_on_six_devices(lm, tmp_path):
    """SmolLM2's 9 heads and 3 kv heads split 3 ways, not 2: a 2x3 mesh of 6 of the 8 devices."""
    c1 = tiny_config(tmp_path / "a", **{"harvest.dtype": "float32", "harvest.mesh_data": 1, "harvest.mesh_model": 1})
    c6 = tiny_config(tmp_path / "b", **{"harvest.dtype": "float32", "harvest.mesh_data": 2, "harvest.mesh_model": 3})
    ref = harvest(c1, lm=lm, devices=jax.devices()[:1], **quiet)
    got = harvest(c6, lm=lm, devices=jax.devices()[:6], **quiet)
    _same_store(ref, got, 1e-5)


@pytest.mark.parametrize("data,model", [(8, 1), (4, 2), (1, 8)])
def test_every_device_does_an_eighth_of_the_work(llama_dir, data, model):
    """XLA's cost analysis of the partitioned forward: each device's FLOPs are 1/8 of the
    one-device forward's (within 5%): no device computes what another does."""
    from sae_jax.harvest import make_forward
    from sae_jax.model.hooks import parse_hooks

    hooks = parse_hooks(HOOKS)

    def flops(mesh):
        lm = load_model(str(llama_dir), mesh=mesh)
        fwd, state = make_forward(lm.model, hooks, np.float32, mesh)
        tokens = jax.ShapeDtypeStruct((16, 64), np.int32, sharding=jax.sharding.NamedSharding(mesh, msh.TOKENS))
        return float(fwd.lower(state, tokens).compile().cost_analysis()["flops"])

    one = flops(make_mesh(1, 1, jax.devices()[:1]))
    each = flops(make_mesh(data, model))
    print(f"mesh {data}x{model}: {each:.4g} FLOPs per device, one device {one:.4g} (ratio {each / one:.4f})")
    assert abs(each / (one / 8) - 1) <= 0.05


def test_weights_are_placed_as_their_shards(llama_dir):
    mesh = make_mesh(2, 4)
    lm = load_model(str(llama_dir), mesh=mesh)
    ref = load_model(str(llama_dir))
    b, r = lm.model.blocks[0], ref.model.blocks[0]
    assert b.wq[...].sharding.spec == P(None, "model") and b.wo[...].sharding.spec == P("model", None)
    assert b.w_down[...].sharding.spec == P("model", None) and lm.model.embed[...].sharding.spec == P("model", None)
    assert b.norm1.weight[...].sharding.is_fully_replicated
    shard = b.wq[...].addressable_shards[0]
    assert shard.data.shape == (256, 256 // 4)
    for got, want in ((b.wq, r.wq), (b.wk, r.wk), (b.wo, r.wo), (b.w_gate, r.w_gate), (lm.model.embed, ref.model.embed)):
        np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(want[...]))


@pytest.mark.heavy
def test_bad_meshes_are_one_line_and_write_nothing(llama_dir, tmp_path):
    base = [
        f"--config.model.path={llama_dir}",
        f"--config.harvest.hooks={HOOKS}",
        "--config.harvest.tokens=2000",
        "--config.harvest.batch_size=8",
        "--config.data.ctx_len=64",
        "--config.harvest.progress=False",
    ]
    cases = [
        (["--config.harvest.mesh_data=3", "--config.harvest.mesh_model=1"], "harvest mesh data=3 x model=1 needs 3 devices, there are 8"),
        (["--config.harvest.mesh_model=3"], "harvest.mesh_model=3 does not divide the model's n_heads 16 and d_mlp 512"),
        (["--config.harvest.mesh_model=6"], "model axes that do: 1, 2, 4, 8, 16"),
        (["--config.harvest.mesh_model=16"], "harvest.mesh_model=16 does not divide the 8 devices"),
        (
            ["--config.harvest.mesh_data=8", "--config.harvest.batch_size=4"],
            "harvest.batch_size=4 does not split over the mesh's data axis",
        ),
    ]
    for i, (extra, msg) in enumerate(cases):
        out = tmp_path / f"o{i}"
        r = run_cli("harvest", *base, f"--config.harvest.out={out}", *extra)
        assert r.returncode == 1, r.stderr
        assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()


def test_the_mesh_picks_the_smallest_model_axis_that_fits(llama_dir):
    """With a device memory given, the automatic mesh splits the weights only as far as needed."""
    cfg = load_model(str(llama_dir)).cfg
    need = msh.weight_bytes_per_device(cfg, 1, 4)
    devs = jax.devices()
    c = _config("x", llama_dir)
    logs = []
    assert msh.harvest_mesh(cfg, c.harvest, 4, devs, logs.append, memory_limit=need * 10).shape == {"data": 8, "model": 1}
    mesh = msh.harvest_mesh(cfg, c.harvest, 4, devs, logs.append, memory_limit=need / 2)
    assert mesh.shape == {"data": 2, "model": 4}  # 75% of need / 2 is 0.375 need: 2 ways (0.5) is over, 4 ways (0.25) fits
    assert "split 4 ways" in logs[-1]
    with pytest.raises(msh.ModelShardingError, match=r"GiB per device even split 8 ways"):
        msh.harvest_mesh(cfg, c.harvest, 4, devs, logs.append, memory_limit=need / 100)
    assert json.dumps(mesh.shape)  # a plain mapping, printable in the log


@pytest.mark.slow
@pytest.mark.parametrize("data,model", [(2, 4), (1, 8)])
def test_two_processes_of_four_devices_write_the_one_device_store(llama_dir, one_device, tmp_path, data, model):
    """launch/local.py: 2 processes x 4 CPU devices (gloo collectives). 2x4: each process holds one
    row of contexts, its 4 devices split the heads; 1x8: the model axis spans both processes, the
    two hold the same rows and process 0 writes them."""
    import subprocess
    import sys

    from conftest import REPO

    c = _config(tmp_path / "s", llama_dir, data, model)
    args = [f"--config.{sec}.{k}={v}" for sec in ("harvest", "data") for k, v in c[sec].items()]
    args += [f"--config.model.path={llama_dir}", "--config.model.dtype=float32"]
    cmd = [sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "-d", "4", "--", "harvest", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list((tmp_path / "s").glob("manifest.process-*"))
    got = open_store(tmp_path / "s")
    assert got.manifest["last_run"]["processes"] == 2
    _same_store(one_device, got, 1e-5)


LOAD_RSS = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from sae_jax.model.loading import load_model
from sae_jax.parallel import make_mesh

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def hwm():  # the peak resident set since the last reset (ru_maxrss would include the forked parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

mesh = make_mesh(1, 8)
jax.device_put(0.0).block_until_ready()
before = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current resident set
lm = load_model(sys.argv[1], "bfloat16", mesh=mesh)
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(lm.model)))
print(json.dumps({"before": before, "peak": hwm(), "after": rss()}))
"""


@pytest.mark.slow
def test_loading_a_1b_model_onto_8_devices_peaks_under_1_5x_its_bf16_size(lm, tmp_path):
    """~1B parameters written as bf16 safetensors in 4 files, loaded in bf16 with the weights
    split 8 ways (1x8): host memory grows by at most 1.5x the weights' bytes (the weights
    themselves, on the 8 simulated CPU devices, are 1x; one tensor's block at a time on top)."""
    import subprocess
    import sys

    from random_models import param_bytes

    d = write_random_llama(tmp_path / "m", lm.tokenizer, files=4, d_model=2048, n_layers=20, n_heads=16, n_kv_heads=8, d_mlp=5632)
    size = param_bytes(d)
    assert size > 2e9  # ~1.04B parameters
    r = subprocess.run([sys.executable, "-c", LOAD_RSS, str(d)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    print(f"weights {size / 2**30:.2f} GiB; peak RSS growth {growth / 2**30:.2f} GiB ({growth / size:.2f}x)")
    assert growth <= 1.5 * size, growth / size
