import os

# Tests run on CPU with 8 simulated devices (set before jax is imported anywhere).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# The settings of the tests that compare one mesh with another to float32 rounding (test_bank,
# test_architectures): the meshes sum in different orders, and larger steps carry that rounding
# further, through near-ties of the selection, than the comparisons' 1e-6 bounds. So: a float32
# encoder (XLA:CPU's bf16 dot kernels differ by shard shape), the decoder at train.lr and the
# biases at 0.1x in scaled units (docs/benchmarks.md, "Figures moved out of the code", has the
# distances measured with and without them). And float32 Adam moments: a bfloat16 moment is
# rounded to 8 bits, so a 1e-7 difference in a gradient that crosses a rounding boundary moves the
# next update by a bfloat16 ulp of it (~2e-5 here); the lean moments' own mesh independence is
# tested in test_adam.py (the same random bits on every mesh).
MESH_MATH = {
    "encoder_dtype": "float32",
    "decoder_lr_scale": 1.0,
    "bias_lr_scale": 0.1,
    "bias_lr_units": "scaled",
    "optimizer_state": "float32",
}


@pytest.fixture(scope="session")
def lm():
    """The embedded SmolLM2-135M, loaded once per test run (about 10 s)."""
    from sae_jax.model.loading import load_model

    return load_model("embedded")


def tiny_config(out, **overrides):
    """A harvest config small enough for tests: two layer-1 hooks, short contexts, small shards."""
    from sae_jax.config import default_config

    c = default_config()
    c.harvest.out = str(out)
    c.harvest.hooks = "blocks.1.hook_resid_post,blocks.1.attn.hook_z"
    c.harvest.tokens = 4000
    c.harvest.batch_size = 8
    c.harvest.seqs_per_shard = 16
    c.harvest.rows_per_record = 128
    c.harvest.progress = False
    c.data.ctx_len = 64
    c.data.shuffle_window = 64
    for k, v in overrides.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def cli_args(out, **overrides) -> list[str]:
    """The same tiny config as command-line overrides for `sae-jax harvest`."""
    c = tiny_config(out, **overrides)
    args = []
    for section in ("harvest", "data"):
        for k, v in c[section].items():
            args.append(f"--config.{section}.{k}={v}")
    return args


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, lm):
    from sae_jax.harvest import harvest

    out = tmp_path_factory.mktemp("stores") / "tiny"
    return harvest(tiny_config(out), log=lambda *a: None, lm=lm)


def run_cli(*args, **kw):
    import subprocess

    return subprocess.run([sys.executable, "-m", "sae_jax.cli", *args], capture_output=True, text=True, cwd=REPO, **kw)


@pytest.fixture(scope="session")
def tiny_run(tiny_store, tmp_path_factory):
    """A finished run on the tiny store: 2 hooks x widths {64, 96} x k {4, 8}, trained on 8
    devices with latents split over `model` (2); the store's last shard is held out."""
    from sae_jax.config import default_config
    from sae_jax.train.loop import train

    c = default_config()
    t = c.train
    t.store, t.run_dir = str(tiny_store.root), str(tmp_path_factory.mktemp("runs") / "run")
    t.widths, t.ks, t.batch_size, t.steps = "64,96", "4,8", 256, 24
    t.mesh_model, t.checkpoint_every, t.log_every, t.dead_tokens, t.progress = 2, 12, 12, 2048, False
    train(c, log=lambda *a: None)
    return Path(t.run_dir)


PEER_PYTHON = Path(os.environ.get("SAE_JAX_PEER_PYTHON", REPO / ".peer-venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory):
    """Tiny random models of every family the zoo loads, built and saved by transformers in the
    peer venv (tests/peers/tiny_models.py), with their reference activations (ARCH.npz)."""
    import subprocess

    assert PEER_PYTHON.exists(), f"{PEER_PYTHON} missing: `make peer-venv` builds the venv with torch + transformers these tests need"
    out = tmp_path_factory.mktemp("tiny_models")
    r = subprocess.run(
        [str(PEER_PYTHON), str(REPO / "tests" / "peers" / "tiny_models.py"), str(out)], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out
