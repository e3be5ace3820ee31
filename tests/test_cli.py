"""`sae-jax` end to end: harvest, info, verify and their errors, as a user runs them."""

import pytest
from conftest import cli_args, run_cli


@pytest.mark.heavy
def test_harvest_info_verify(tmp_path):
    out = tmp_path / "s"
    r = run_cli("harvest", *cli_args(out, **{"harvest.tokens": 1500}))
    assert r.returncode == 0, r.stderr
    assert "status     complete" in r.stdout and "one compiled executable for [8, 64]" in r.stdout
    r = run_cli("info", str(out))
    assert r.returncode == 0 and "blocks.1.attn.hook_z" in r.stdout and "width   576" in r.stdout
    r = run_cli("verify", str(out))
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stderr
    f = next(out.glob("shard-00000.blocks.1.hook_resid_post.array_record"))
    data = bytearray(f.read_bytes())
    data[-50] ^= 1
    f.write_bytes(bytes(data))
    r = run_cli("verify", str(out))
    assert r.returncode == 1 and f"{f}: checksum mismatch" in r.stderr


@pytest.mark.heavy
def test_cli_errors(tmp_path):
    r = run_cli("harvest", "--config.harvest.nonsense=3")
    assert (
        r.returncode == 1
        and r.stderr.strip()
        == "sae-jax harvest: error: --config.harvest.nonsense: no such setting; `sae-jax harvest --help` lists every setting"
    )
    r = run_cli("train", "--config.train.widht=64")
    assert r.returncode == 1 and "--config.train.widht: no such setting; did you mean train.widths?" in r.stderr
    r = run_cli("harvest", *cli_args(tmp_path / "x"), "--config.harvest.hooks=blocks.40.hook_mlp_out")
    assert r.returncode == 1 and "layer 40 is out of range" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("harvest", *cli_args(tmp_path / "y"), f"--config.model.path={tmp_path / 'missing.gguf'}")
    assert r.returncode == 1 and "missing.gguf" in r.stderr and "does not exist" in r.stderr
    r = run_cli("info", str(tmp_path))
    assert r.returncode == 1 and "not an activation store" in r.stderr
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_every_config_file_loads_and_names_real_settings():
    """Each configs/*.py builds a config whose keys are the defaults' (a stale key would make
    `--config=` fail for the user) and whose train settings pass every rule."""
    import importlib.util

    from conftest import REPO

    from sae_jax.config import default_config
    from sae_jax.train.settings import TrainSettings

    base = default_config()
    files = sorted((REPO / "configs").glob("*.py"))
    assert len(files) >= 5
    for f in files:
        spec = importlib.util.spec_from_file_location(f.stem, f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config()
        for section in c:
            assert set(c[section].keys()) == set(base[section].keys()), f
        TrainSettings.from_config(c.train)  # every rule that needs neither store nor devices


@pytest.mark.heavy
def test_first_hour_mistakes_get_one_line(tmp_path, tiny_run):
    """What a new user types wrong: a path where a setting goes, a config file that is not there,
    `--help` on the one-path commands, an output folder that cannot be written. One line each
    (no traceback), the right exit status, nothing written."""
    r = run_cli("train", str(tmp_path / "store"))
    assert r.returncode == 2 and f"--config.train.store={tmp_path / 'store'}" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = run_cli("train", "--config=configs/nope.py")
    assert r.returncode == 2 and "--config=configs/nope.py: no such config file" in r.stderr and len(r.stderr.splitlines()) == 1
    for cmd, what in (("plot", "RUN"), ("info", "STORE"), ("verify", "STORE")):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and f"usage: sae-jax {cmd} {what}" in r.stdout, (cmd, r.stderr)
    r = run_cli("atlas", str(tiny_run), "--out", "/proc/no-atlas-here")
    assert r.returncode == 1 and r.stderr.strip().startswith("sae-jax atlas: error: /proc/no-atlas-here") and "Traceback" not in r.stderr, (
        r.stderr
    )
    assert not list(tmp_path.iterdir())
