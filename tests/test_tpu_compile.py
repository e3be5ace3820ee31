"""The real train step compiled by libtpu's compiler for TPU topologies, from this CPU (deviceless
ahead-of-time compilation: no TPU needed). Runs `sae-jax compile-check --topology` in the
`.tpu-venv` (`make tpu-venv`: this project plus libtpu, kept apart from the CPU venv)."""

import json
import os
import subprocess

import pytest
from conftest import REPO

TPU_PYTHON = REPO / ".tpu-venv" / "bin" / "python"
pytestmark = pytest.mark.aot


def _compile_check(tmp_path, topology, width, encoder, *extra, d_in=2304, k=64, batch=8192):
    assert TPU_PYTHON.exists(), f"{TPU_PYTHON} missing: `make tpu-venv` builds the venv with libtpu these tests need"
    out = tmp_path / f"{topology.replace(':', '_')}_{width}_{encoder}.json"
    args = [
        "--topology", topology, "--d-in", str(d_in), "--json", str(out),
        "--config.train.hooks=blocks.20.hook_resid_post", f"--config.train.widths={width}", f"--config.train.ks={k}",
        f"--config.train.batch_size={batch}", f"--config.train.encoder={encoder}", "--config.train.encoder_dtype=bfloat16", *extra,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    r = subprocess.run(
        [str(TPU_PYTHON), "-m", "sae_jax.cli", "compile-check", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=1200
    )
    return r, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("encoder", ["pallas_tpu", "stream"])
@pytest.mark.parametrize("topology", ["v5e:1x1", "v5p:1x1x1"])
def test_train_step_compiles_for_tpu_with_auxk(tmp_path, topology, encoder):
    """d_in 2304, 2^16 latents, k 64, 8192 rows, bf16: the step (AuxK branch, optimizer,
    donation) compiles for the chip and fits its HBM; the Pallas kernel is lowered by Mosaic."""
    r, rep = _compile_check(tmp_path, topology, 65536, encoder)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["device_kind"].startswith("tpu TPU v5") and rep["fits"] is True
    b = rep["bytes_per_device"]
    assert b["params"] == (2 * 2304 * 65536 + 65536 + 2304) * 4  # W_enc, W_dec, b_enc, b_dec in float32
    assert b["xla_temporaries"] > 0 and b["peak"] <= rep["memory_limit_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["pallas_tpu", "stream"])
@pytest.mark.parametrize("topology,mesh_model", [("v5e:2x2", 4), ("v5p:1x1x1", 1)])
def test_2_18_latents_compile_for_v5e_and_v5p(tmp_path, topology, mesh_model, encoder):
    """2^18 latents: over 4 v5e chips (the latents split 4 ways), or on one v5p chip. On the mesh
    the update runs inside the AuxK branches, so the gradients do not leave the `cond` twice:
    under 4 parameter-sized float32 matrices of temporaries (5 with the update after it)."""
    r, rep = _compile_check(tmp_path, topology, 262144, encoder, f"--config.train.mesh_model={mesh_model}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["fits"] is True and rep["mesh"]["model"] == mesh_model
    if mesh_model > 1:
        assert rep["bytes_per_device"]["temporaries_parameter_sized"]["count"] < 4, rep["bytes_per_device"]


def test_one_v5e_chip_fits_2_18_latents_and_refuses_2_19_clearly(tmp_path):
    """One 16 GiB v5e chip: 2^18 latents fit (9 GiB of state, the update block by block: no
    parameter-sized copy beyond the two gradients), as libtpu's buffer assignment counts them.
    2^19: libtpu's own HBM check refuses the program; the command says so in one line with the
    state's size (float32 params, bfloat16 moments) and what to change, exit 1."""
    r, rep = _compile_check(tmp_path, "v5e:1x1", 262144, "pallas_tpu", "--no-widest")
    assert r.returncode == 0 and rep["fits"] is True, r.stderr[-3000:]
    b = rep["bytes_per_device"]
    assert b["peak"] < 14.5 * 2**30 and b["temporaries_parameter_sized"]["count"] <= 2, b
    r, rep = _compile_check(tmp_path, "v5e:1x1", 524288, "pallas_tpu", "--no-widest")
    assert r.returncode == 1 and rep is None, r.stderr[-3000:]
    assert "refused by the tpu TPU v5 lite compiler" in r.stderr and "CompileTimeHbmOom" in r.stderr
    assert "state 18.01 GiB per device" in r.stderr and "raise train.mesh_model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_16m_latent_dictionary_is_planned_on_64_v5p_chips(tmp_path):
    """OpenAI's scale: 2^24 latents at d_in 4096 split over 64 v5p chips fits each chip's 95 GiB;
    2^20 at d_in 2304 fits one chip (float32 params 18 GiB, bfloat16 moments 18 GiB); 2^21 on one
    chip is refused with the numbers."""
    r, rep = _compile_check(tmp_path, "v5p:4x4x4", 2**24, "pallas_tpu", "--config.train.mesh_model=64", d_in=4096, k=32)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["devices"] == 64 and rep["mesh"] == {"data": 1, "model": 64} and rep["fits"] is True
    r, rep = _compile_check(tmp_path, "v5p:1x1x1", 2**20, "pallas_tpu")
    assert r.returncode == 0 and rep["fits"] is True, r.stderr[-3000:]
    assert 36 * 2**30 <= rep["bytes_per_device"]["state"] < 36.1 * 2**30
    r, rep = _compile_check(tmp_path, "v5p:1x1x1", 2**21, "pallas_tpu", "--no-widest")
    assert r.returncode == 1 and ("over the 95.00 GiB limit" in r.stderr or "refused by the tpu" in r.stderr), r.stderr[-3000:]
