"""`TrainSettings`: every train setting checked before any work, through the CLI as a user runs it."""

import dataclasses

import numpy as np
import pytest

from sae_jax import cli
from sae_jax.config import default_config
from sae_jax.train.settings import SettingsError, TrainSettings

# one bad value per setting: the value, and what the message must say besides the key
BAD = {
    "store": ("", "must name a directory"),
    "run_dir": (" ", "must name a directory"),
    "architecture": ("gated", "choose from topk, batchtopk, jumprelu, relu"),
    "out_hooks": ("blocks.1.hook_mlp_out", "name the transcoders' input hooks"),
    "skip": (True, "a transcoder setting"),
    "widths": ("64,0", "positive widths"),
    "ks": ("0", "between 1 and the smallest width"),
    "l1_coefs": ("0.1", "does not use it"),
    "l0_coefs": ("x", "expected comma-separated numbers"),
    "sparsity_warmup_frac": (1.5, "in [0, 1]"),
    "jumprelu_bandwidth": (0.0, "> 0"),
    "jumprelu_init_threshold": (-1.0, "> 0"),
    "batchtopk_cap": (0, "at least 1"),
    "threshold_decay": (1.0, "in [0, 1)"),
    "matryoshka_prefixes": ("64,32", "strictly increasing"),
    "batch_size": (0, "positive"),
    "steps": (-3, "positive"),
    "lr": (-1.0, ">= 0 and finite"),
    "bias_lr_scale": (float("nan"), ">= 0 and finite"),
    "bias_lr_units": ("store", "choose from raw, scaled"),
    "decoder_lr_scale": (-1.0, ">= 0 and finite"),
    "adam_b1": (1.0, "in [0, 1)"),
    "adam_b2": (-0.1, "in [0, 1)"),
    "adam_eps": (0.0, "> 0 and finite"),
    "optimizer_state": ("float16", "choose from bfloat16, float32"),
    "warmup_steps": (-1, ">= 0"),
    "decay_frac": (2.0, "in [0, 1]"),
    "dead_tokens": (0, "positive"),
    "aux_coef": (-0.5, ">= 0"),
    "k_aux": (10**9, "at most the smallest width"),
    "resample_tokens": (-1, "must be >= 0 (0: never)"),
    "aux_pool": (-2, "must be >= -1 (0: auto, -1: every dead latent)"),
    "encoder_init_scale": (0.0, "positive"),
    "encoder": ("fast", "choose from auto"),
    "encoder_block": (0, "positive"),
    "encoder_dtype": ("float8", "auto, float32, bfloat16"),
    "mesh_data": (-1, ">= 0"),
    "mesh_model": (3, "does not divide the 8 devices"),
    "checkpoint_every": (0, "positive"),
    "keep_checkpoints": (0, "positive"),
    "log_every": (0, "positive"),
    "seed": (-1, ">= 0"),
    "holdout_shards": (-1, ">= 0"),
    "max_nan_streak": (0, "positive"),
    "verify_store": ("maybe", "verify_store"),
    "progress": ("perhaps", "progress"),
}
# settings whose every value is valid on its own: a hook name is checked against the store
# (tests/test_architectures.py::test_bad_settings_are_refused)
NO_RULE_WITHOUT_A_STORE = {"hooks"}


def test_every_setting_has_a_typed_field_and_a_bad_value():
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    assert fields == set(default_config().train.keys())
    assert set(BAD) | NO_RULE_WITHOUT_A_STORE == fields


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_setting_exits_naming_the_key_and_writes_nothing(key, tmp_path, capsys):
    value, said = BAD[key]
    run, store = tmp_path / "run", tmp_path / "store"
    args = [f"--config.train.run_dir={run}", f"--config.train.store={store}", f"--config.train.{key}={value}"]
    code = cli.main(["sae-jax", "train", *args])
    err = capsys.readouterr().err
    assert code in (1, 2), err
    assert f"train.{key}" in err and said in err, err
    assert "Traceback" not in err
    assert not run.exists() and not store.exists() and not any(tmp_path.iterdir())


def test_mesh_rules_name_the_device_count():
    s = TrainSettings.defaults(mesh_model=4, batch_size=4096)
    assert s.mesh_shape(8) == (2, 4)
    with pytest.raises(SettingsError, match="train.mesh_model=4 does not divide the 6 devices"):
        s.mesh_shape(6)
    with pytest.raises(SettingsError, match="train.mesh_data=4 x train.mesh_model=4 = 16 devices, there are 8"):
        s.replace(mesh_data=4).mesh_shape(8)
    with pytest.raises(SettingsError, match="train.batch_size=100 does not divide over 8 data-parallel devices"):
        s.replace(mesh_model=1, batch_size=100).mesh_shape(8)


def test_settings_are_typed_frozen_and_rechecked_on_replace():
    s = TrainSettings.defaults(widths=(64, 128), ks=(4,))
    assert s.widths == (64, 128) and isinstance(s.lr, float) and s.sparse
    c = default_config()
    c.train.widths, c.train.ks, c.train.matryoshka_prefixes = " 64, 128", "4,8", "16,32"
    t = TrainSettings.from_config(c.train)
    assert (t.widths, t.ks, t.matryoshka_prefixes) == ((64, 128), (4, 8), (16, 32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.lr = 1.0
    with pytest.raises(SettingsError, match="train.lr=-0.1"):
        t.replace(lr=-0.1)
    # a run's identity compares lists as parsed: an earlier run's "64, 128" is the same run
    assert TrainSettings.canonical_identity({"widths": "64, 128", "ks": "4,8", "matryoshka_prefixes": "16,32"}) == {
        **TrainSettings.canonical_identity({}),
        "widths": "64,128",
        "ks": "4,8",
        "matryoshka_prefixes": "16,32",
    }


@pytest.mark.parametrize("job", ["train", "harvest", "demo", "compile-check"])
def test_help_lists_each_field_with_its_default_and_meaning(job, capsys):
    try:
        code = cli.main(["sae-jax", job, "--help"])
    except SystemExit as e:  # the config-driven jobs print their fields and exit
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    sections = cli.SECTIONS[job]
    c = default_config()
    for section in sections:
        for key, value in c[section].items():
            assert f"--config.{section}.{key}={value!r}" in out, (job, key)
    if "train" in sections:
        assert "tokens per step (a multiple of the store's rows per record)" in out  # train.batch_size's comment
    if "harvest" in sections:
        assert "contexts per forward pass" in out  # harvest.batch_size's comment


def test_a_run_from_before_the_recipe_change_is_another_run():
    """An identity written before `bias_lr_scale` and the 8e-4 rule existed canonicalises to what
    that run trained with (biases at 1x in scaled units, lr = 0 meaning 2e-4 / sqrt(width / 2^14)),
    not to today's defaults: resuming it under the new recipe is refused by the run-directory check.
    One written before `bias_lr_units` (biases at 0.1x) read its scale in scaled units; one written
    before the Adam constants were settings trained with optax's 0.9 / 0.999 / 1e-8."""
    s = TrainSettings.defaults()
    new = ("bias_lr_scale", "bias_lr_units", "decoder_lr_scale", "lr_rule", "adam_b1", "adam_b2", "adam_eps")
    old = {k: v for k, v in s.identity().items() if k not in new}
    canon = TrainSettings.canonical_identity(old)
    assert canon["bias_lr_scale"] == 1.0 and canon["lr_rule"] == "0.0002 / sqrt(width / 2^14)"
    assert canon["decoder_lr_scale"] == 1.0 and canon["bias_lr_units"] == "scaled"
    assert (canon["adam_b1"], canon["adam_b2"], canon["adam_eps"]) == (0.9, 0.999, 1e-8)
    before_units = {k: v for k, v in s.identity().items() if k != "bias_lr_units"}
    canon = TrainSettings.canonical_identity({**before_units, "bias_lr_scale": 0.1, "lr_rule": "0.0008 / sqrt(width / 2^14)"})
    assert canon["bias_lr_units"] == "scaled" and canon["bias_lr_scale"] == 0.1
    assert canon != s.identity()
    assert canon != s.identity()
    assert TrainSettings.canonical_identity(s.identity()) == s.identity()
    assert s.replace(lr=1e-3).identity()["lr_rule"] == ""  # an explicit lr needs no rule


def test_aux_pool_resolves_per_bank():
    """`train.aux_pool = 0`: 4 x k_aux dead latents, 0 (every dead latent, the sparse path) where
    that covers the width or for -1; a pool below AuxK's k names both; a run written before the
    setting existed selected over every dead latent (-1), another run."""
    s = TrainSettings.defaults()
    assert s.k_aux_for(2304) == 512 and s.aux_pool_for(2304, 2**16) == 2048 and s.aux_pool_for(2304, 2**20) == 2048
    assert s.aux_pool_for(576, 2**14) == 1152 and s.aux_pool_for(64, 256) == 128  # k_aux 288 -> 1,152; 32 -> 128
    assert s.aux_pool_for(2304, 2048) == 0  # the pool would be the whole width
    assert s.replace(aux_pool=-1).aux_pool_for(2304, 2**20) == 0 and s.replace(aux_pool=4096).aux_pool_for(2304, 2**20) == 4096
    with pytest.raises(SettingsError, match=r"train.aux_pool=100: must be at least AuxK's k \(512"):
        s.replace(aux_pool=100).aux_pool_for(2304, 2**16)
    before = {k: v for k, v in s.identity().items() if k != "aux_pool"}
    assert TrainSettings.canonical_identity(before)["aux_pool"] == -1 and TrainSettings.canonical_identity(before) != s.identity()


def test_default_learning_rate_by_architecture():
    """`train.lr = 0`: 1.2e-3 / sqrt(width / 2^14) per member, JumpReLU 2e-4 / sqrt(...) (at 8e-4 its
    thresholds left half its latents dead); the identity records the rule the run trains with, so
    a JumpReLU run of the other rule is another run."""
    from sae_jax.sae.bank import BankSpec
    from sae_jax.train.optimizer import member_lrs

    for arch, base, coefs in (("topk", 1.2e-3, ()), ("relu", 1.2e-3, (0.01, 0.01)), ("jumprelu", 2e-4, (0.01, 0.01))):
        spec = BankSpec(
            hooks=("a", "a"),
            widths=(2**14, 2**16),
            ks=(0, 0) if coefs else (8, 8),
            d_in=8,
            width=2**16,
            k_aux=4,
            architecture=arch,
            coefs=coefs,
        )
        np.testing.assert_allclose(member_lrs(spec, TrainSettings.defaults()), [base, base / 2], rtol=1e-6)
        np.testing.assert_allclose(member_lrs(spec, TrainSettings.defaults(lr=3e-4)), [3e-4, 3e-4], rtol=1e-6)
    jump = TrainSettings.defaults(architecture="jumprelu", l0_coefs=(0.01,))
    assert jump.identity()["lr_rule"] == "0.0002 / sqrt(width / 2^14)"
    assert TrainSettings.defaults().identity()["lr_rule"] == "0.0012 / sqrt(width / 2^14)"
