"""`sae-jax compile-check --job harvest`: the forward of the models the published SAE suites are
trained on, compiled from their config.json with abstract sharded weights by libtpu's compiler
and XLA's CUDA compiler (from this CPU), and for simulated CPU devices."""

import json
import os
import subprocess

import pytest
from conftest import REPO, run_cli

TPU_PYTHON = REPO / ".tpu-venv" / "bin" / "python"
GPU_PYTHON = REPO / ".gpu-venv" / "bin" / "python"
MODELS = REPO / "configs" / "models"
GIB = 2**30


def _check(python, tmp_path, model, target, hooks, *extra):
    assert python.exists(), f"{python} missing: `make tpu-venv` / `make gpu-venv` build the compilers' venvs"
    out = tmp_path / "rep.json"
    args = ["--job", "harvest", "--model-config", str(MODELS / f"{model}.json"), *target, "--json", str(out)]
    args += [f"--config.harvest.hooks={hooks}", "--config.data.ctx_len=1024", "--config.model.dtype=bfloat16", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [str(python), "-m", "sae_jax.cli", "compile-check", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=1200
    )
    return r, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.aot
def test_gemma_2_9b_fits_a_v5e_8_split_two_ways(tmp_path):
    r, rep = _check(TPU_PYTHON, tmp_path, "gemma-2-9b", ["--topology", "v5e:2x4"], "blocks.20.hook_resid_post,blocks.31.hook_resid_post")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["device_kind"].startswith("tpu TPU v5") and rep["fits"] is True
    # 18.5 GB of bf16 weights over 16 GiB chips: the smallest model axis that leaves room is 2
    assert rep["mesh"] == {"data": 4, "model": 2}
    b = rep["bytes_per_device"]
    assert 8.4 * GIB < b["weights"] < 8.8 * GIB and b["peak"] <= rep["memory_limit_bytes"]
    assert rep["tokens_per_s"] > 0 and rep["write_bytes_per_token"] == 2 * 3584 * 2 and rep["writer_gbps_measured"] > 0
    assert "expected" in r.stdout and "writes" in r.stdout


@pytest.mark.aot
def test_gemma_2_9b_is_refused_on_one_v5e_chip_with_the_mesh_that_fits(tmp_path):
    r, rep = _check(TPU_PYTHON, tmp_path, "gemma-2-9b", ["--topology", "v5e:1x1"], "blocks.20.hook_resid_post")
    assert r.returncode == 1 and rep is None
    line = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and "refused" in line, r.stderr[-2000:]
    assert "the smallest mesh that holds it: model=2 (2 devices of 16 GiB" in line


@pytest.mark.aot
def test_llama_3_3_70b_on_a_v5e_8_is_refused_naming_16_chips(tmp_path):
    """8 kv heads: a model axis of 16 keeps the key / value projections whole on each chip."""
    r, rep = _check(TPU_PYTHON, tmp_path, "llama-3.3-70b", ["--topology", "v5e:2x4"], "blocks.40.hook_resid_post")
    assert r.returncode == 1 and rep is None and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "16.43 GiB per device even split 8 ways" in line
    assert "the smallest mesh that holds it: model=16 (16 devices of 16 GiB, 10.56 GiB of weights each)" in line


@pytest.mark.aot
@pytest.mark.slow
def test_llama_3_3_70b_fits_a_v5p_8(tmp_path):
    r, rep = _check(
        TPU_PYTHON, tmp_path, "llama-3.3-70b", ["--topology", "v5p:2x2x2"], "blocks.40.hook_resid_post,blocks.60.hook_resid_post"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["fits"] is True and rep["mesh"]["model"] == 2  # 70.5 GB of bf16 weights: half of it is 75% of a 95 GiB chip
    assert rep["bytes_per_device"]["peak"] <= rep["memory_limit_bytes"]


@pytest.mark.aot
@pytest.mark.slow
def test_llama_3_3_70b_fits_8_h100s(tmp_path):
    r, rep = _check(GPU_PYTHON, tmp_path, "llama-3.3-70b", ["--gpu", "h100:8"], "blocks.40.hook_resid_post,blocks.60.hook_resid_post")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["device_kind"] == "gpu NVIDIA H100 80GB HBM3" and rep["fits"] is True
    assert rep["mesh"] == {"data": 2, "model": 4} and rep["hosts"] == 1
    # 2 x 70B-parameter layers' FLOPs to layer 60 at 50% of 8 x 989 TFLOP/s: tens of thousands of tok/s
    assert 20_000 < rep["tokens_per_s"] < 60_000


@pytest.mark.heavy
def test_simulated_devices_and_a_memory_limit(tmp_path):
    """Without a compiler venv: the embedded model on 6 simulated CPU devices as 2x3, and a
    memory limit the forward exceeds refused with the bytes per device, exit 1."""
    js = tmp_path / "r.json"
    base = ["compile-check", "--job", "harvest", "--devices", "6", "--model-config", "embedded", "--json", str(js)]
    r = run_cli(*base, "--config.harvest.mesh_data=2", "--config.harvest.mesh_model=3", "--config.harvest.hooks=blocks.12.hook_resid_post")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(js.read_text())
    assert rep["mesh"] == {"data": 2, "model": 3} and rep["devices"] == 6 and rep["params"] > 1.3e8
    r = run_cli(*base, "--memory-gib", "0.05", "--config.harvest.mesh_model=3", "--config.harvest.hooks=blocks.12.hook_resid_post")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "sae-jax compile-check: refused: the forward needs" in r.stderr and "GiB per device" in r.stderr
