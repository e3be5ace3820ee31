"""The real train step compiled by XLA's CUDA compiler for H100 and H200 targets, from this CPU
(the CUDA plugin's compile-only devices: no GPU, no driver). Runs `sae-jax compile-check --gpu` in
`.gpu-venv` (`make gpu-venv`: this project plus jax's CUDA plugin and ptxas, kept apart from the CPU venv)."""

import json
import os
import subprocess

import pytest
from conftest import REPO

GPU_PYTHON = REPO / ".gpu-venv" / "bin" / "python"
pytestmark = pytest.mark.aot


def _compile_check(tmp_path, gpu, width, encoder, d_in=2304, k=64, batch=8192):
    assert GPU_PYTHON.exists(), f"{GPU_PYTHON} missing: `make gpu-venv` builds the venv with jax's CUDA plugin these tests need"
    out = tmp_path / f"{gpu}_{width}_{encoder}.json"
    args = [
        "--gpu", gpu, "--d-in", str(d_in), "--json", str(out),
        "--config.train.hooks=blocks.20.hook_resid_post", f"--config.train.widths={width}", f"--config.train.ks={k}",
        f"--config.train.batch_size={batch}", f"--config.train.encoder={encoder}", "--config.train.encoder_dtype=bfloat16",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [str(GPU_PYTHON), "-m", "sae_jax.cli", "compile-check", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=900
    )
    return r, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("encoder", ["pallas_gpu", "rows", "auto"])
def test_train_step_compiles_for_h100_with_auxk(tmp_path, encoder):
    """d_in 2304, 2^16 latents, k 64, 8192 rows, bf16: the step (AuxK branch, optimizer,
    donation) compiles for an H100; the Pallas kernel is lowered by Triton for sm_90."""
    r, rep = _compile_check(tmp_path, "h100", 65536, encoder)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["device_kind"] == "gpu NVIDIA H100 80GB HBM3" and rep["fits"] is True
    assert rep["memory_limit_bytes"] == int(0.9 * 80 * 2**30) and 0 < rep["bytes_per_device"]["peak"] < 20 * 2**30


def test_the_h100_step_sorts_no_row_and_its_roofline_comes_from_the_compiled_hlo(tmp_path):
    """d_in 2304, 2^16 latents, k 64, 8192 rows, bf16, `auto`: no sort in the compiled step is
    wider than a candidate set of the tournament (the backward's one sort of slots by latent
    aside: rows 1), the main path sorts a few hundred keys per row where `lax.top_k` sorted all
    65,536, and the roofline read from the optimized HLO puts the selection under half the
    matmuls (one read of the float32 pre-activations is most of it) and AuxK's above it. AuxK
    over its pool of dead latents (`train.aux_pool`, 2,048 here) sorts one more set of 2,048 keys
    a row and no slots of its own, and adds under 15% to the step (over every dead latent, its
    512 slots a row through the sparse decode and backward made the step 5.5x the main path's)."""
    r, rep = _compile_check(tmp_path, "h100", 65536, "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    roof = rep["hlo_roofline"]
    assert roof["gpu"] == "h100" and "roofline   from the compiled HLO on an H100" in r.stdout
    main, aux = roof["main"], roof["aux"]
    row_sorts = {int(n): rows for n, rows in main["sorts"].items() if rows >= 8192}  # sorts over every row of the batch
    slot_sorts = {int(n) for n, rows in main["sorts"].items() if rows < 8192}
    assert row_sorts and max(row_sorts) <= 1024 and slot_sorts <= {8192 * 64}, main["sorts"]
    assert 0 < main["select_sorted_per_row"] <= 8192
    assert abs(main["matmul_tflop"] - 2 * 8192 * 2304 * 65536 / 1e12) < 0.01 * main["matmul_tflop"]
    assert 0 < main["select_over_matmul"] < 0.5 and aux["select_ms"] > main["select_ms"]
    assert main["launches"] < 2000  # no loop of thousands of trips (one per few rows) left in the step
    # the sums over gathered decoder rows read each row once (`topk.gather_sum`, `gather_dots` by
    # groups of slots): as einsums over [R, k, d] blocks the gathers were written out transposed
    # and read back (other kernels 18.4 ms, AuxK live 145 ms; 13.2 and 94 ms now)
    assert main["other_ms"] < 16, main["other_ms"]
    assert aux["sorts"] == {**main["sorts"], "2048": 8192.0} and aux["select_sorted_per_row"] <= 8192, aux["sorts"]
    assert aux["step_ms"] < 1.15 * main["step_ms"], (main["step_ms"], aux["step_ms"])


def _args(tmp_path, gpu, width):
    out = tmp_path / f"{gpu}_{width}.json"
    args = [
        "--gpu", gpu, "--d-in", "2304", "--json", str(out), "--config.train.hooks=blocks.20.hook_resid_post",
        f"--config.train.widths={width}", "--config.train.ks=64", "--config.train.batch_size=8192",
        "--config.train.encoder_dtype=bfloat16",
    ]  # fmt: skip
    return args, out


def _run(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [str(GPU_PYTHON), "-m", "sae_jax.cli", "compile-check", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=1500
    )


def test_a_million_latents_fit_one_h100_and_where_the_bytes_go(tmp_path):
    """2^20 latents at d_in 2304 (AuxK live, bf16 encoder, the default bfloat16 Adam moments): the
    state is 36 GiB (float32 params 18, moments 9 + 9) and the compiler's temporaries hold no
    parameter-sized buffer beyond the two dense gradients, so the step fits within 90% of an
    H100 (72 GiB). The report names each part."""
    args, out = _args(tmp_path, "h100", 2**20)
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    b, parts = rep["bytes_per_device"], rep["bytes_per_device"]["state_parts"]
    matrix = 2304 * 2**20 * 4
    assert parts["params"] == 2 * matrix + (2**20 + 2304) * 4
    assert parts["optimizer mu"] == parts["optimizer nu"] == matrix + (2**20 + 2304) * 4  # bf16 matrices, f32 biases
    assert "bfloat16" in parts["optimizer mu dtypes"]
    big = b["temporaries_parameter_sized"]
    assert big["bytes"] <= 2 * matrix, big  # the two dense gradients (the encoder's bf16 cast time-shares them)
    assert b["peak"] <= 72 * 2**30 and rep["fits"] is True
    assert "optimizer mu" in r.stdout and "parameter-sized arrays" in r.stdout and "90% of 80 GiB of HBM" in r.stdout


@pytest.mark.slow
def test_two_million_latents_fit_one_h200_and_one_h100_names_the_widest_that_fits(tmp_path):
    """2^21 latents: within 90% of an H200's 141 GiB; refused on an H100 (exit 1), and the refusal
    names the widest width that fits, which a compile confirms (between 2^20 and 2^21)."""
    args, out = _args(tmp_path, "h200", 2**21)
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text())["fits"] is True
    args, out = _args(tmp_path, "h100", 2**21)
    r = _run(args)
    assert r.returncode == 1 and "over the 72.00 GiB limit" in r.stderr, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["fits"] is False
    widest = rep["widest"]
    assert 2**20 < widest["widths"][0] < 2**21 and widest["widths"][0] % 4096 == 0
    assert widest["peak"] <= rep["memory_limit_bytes"]
    assert f"the widest that fits: train.widths={widest['widths'][0]} fits" in r.stderr


def test_bad_gpu_target(tmp_path):
    r, _ = _compile_check(tmp_path, "h900", 4096, "auto", d_in=256)
    assert r.returncode == 1 and "--gpu 'h900': one of h100, h200" in r.stderr
