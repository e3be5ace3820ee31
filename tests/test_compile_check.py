"""`sae-jax compile-check`: the step compiled for a mesh without training, per-device memory,
FLOPs, tokens/s, and a refusal with the numbers when it does not fit."""

import json

import pytest
from conftest import run_cli


def _args(store, **kw):
    c = {"train.store": str(store.root), "train.widths": "256", "train.ks": "8", "train.batch_size": 512, "train.mesh_model": 2, **kw}
    return [f"--config.{k}={v}" for k, v in c.items()]


def test_compile_check_reports_exact_state_bytes(tiny_store, tmp_path):
    out = tmp_path / "cc.json"
    r = run_cli("compile-check", "--devices", "8", "--peak-tflops", "100", "--json", str(out), *_args(tiny_store), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["mesh"] == {"data": 4, "model": 2} and rep["devices"] == 8
    # 2 members (the store's two hooks), d_in 576, width 256 split over model=2: W_enc, W_dec [2, 576, 128], b_enc [2, 128], b_dec [2, 576]
    m, d, w = 2, 576, 128
    params = 4 * (2 * m * d * w + m * w + m * d)
    b = rep["bytes_per_device"]
    # Adam's two moments: the matrices' in bfloat16 (train.optimizer_state), the biases' in float32;
    # two int32 step counts (Adam's and the schedule's)
    moment = 2 * (2 * m * d * w) + 4 * (m * w + m * d)
    assert b["params"] == params and b["optimizer"] == 2 * moment + 2 * 4
    parts = b["state_parts"]
    assert parts["params"] == params and parts["optimizer mu"] == parts["optimizer nu"] == moment
    assert sorted(parts["optimizer mu dtypes"]) == ["bfloat16", "float32"]
    assert b["batch"] == 2 * m * (512 // 4) * d  # bfloat16 rows of this device's data slice
    assert b["peak"] >= b["state"] and b["xla_arguments"] >= b["state"]
    assert rep["step_flops"] == m * (2 * 512 * d * 256 + 2 * 512 * 8 * 4 * d)
    assert abs(rep["tokens_per_s"] - 512 / (rep["step_flops"] / (8 * 100e12 * 0.5))) < 1e-6 * rep["tokens_per_s"]
    assert "memory " in r.stdout and "per device at the step's peak" in r.stdout and "tok/s" in r.stdout


def test_compile_check_refuses_what_does_not_fit(tiny_store):
    r = run_cli("compile-check", "--devices", "8", "--memory-gib", "0.001", *_args(tiny_store), timeout=600)
    assert r.returncode == 1
    assert "DOES NOT FIT" in r.stdout
    assert "refused: the step needs" in r.stderr and "GiB per device" in r.stderr and "over the 0.00 GiB limit" in r.stderr
    assert "no narrower width to try" in r.stderr  # 256 latents: the widest-fit search has nothing to try


@pytest.mark.heavy
def test_compile_check_without_a_store_and_bad_input(tiny_store):
    r = run_cli(
        "compile-check",
        "--devices",
        "16",
        "--d-in",
        "768",
        "--config.train.hooks=blocks.8.hook_resid_post",
        "--config.train.widths=4096",
        "--config.train.mesh_model=4",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data=4 x model=4 on 16 cpu devices" in r.stdout
    r = run_cli("compile-check", "--devices", "6", *_args(tiny_store, **{"train.mesh_model": 4}), timeout=600)
    assert r.returncode == 1 and "train.mesh_model=4 does not divide the 6 devices" in r.stderr, r.stderr[-2000:]
    r = run_cli("compile-check", "--devices", "8", "--d-in", "768", timeout=600)
    assert r.returncode == 1 and "name the hooks in train.hooks" in r.stderr, r.stderr[-2000:]


@pytest.mark.heavy
def test_a_refusal_names_the_widest_width_that_fits(tmp_path):
    """65,536 latents at d_in 256 under a 0.25 GiB limit do not fit; the search compiles narrower
    banks, fits a line, confirms its guess by a compile, and names a width between a quarter and
    all of the refused one, a multiple of its step (4,096), whose compiled peak is within the limit."""
    out = tmp_path / "cc.json"
    r = run_cli(
        "compile-check", "--devices", "1", "--d-in", "256", "--memory-gib", "0.25", "--json", str(out),
        "--config.train.hooks=blocks.8.hook_resid_post", "--config.train.widths=65536", "--config.train.ks=16",
        "--config.train.batch_size=512", timeout=900,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["fits"] is False and rep["bytes_per_device"]["peak"] > 0.25 * 2**30
    w = rep["widest"]
    assert 16384 <= w["widths"][0] < 65536 and w["widths"][0] % 4096 == 0 and w["peak"] <= 0.25 * 2**30, w
    assert f"the widest that fits: train.widths={w['widths'][0]} fits" in r.stderr
