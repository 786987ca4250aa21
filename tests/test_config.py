"""Config tree: presets, TOML, overrides and the one-line errors for each kind of bad input."""

import pytest

from linglab.config import PRESETS, ConfigError, load_config, to_toml


def test_presets_load_and_validate():
    for name in PRESETS:
        load_config(name)
    assert load_config("small").model.hidden_size == 512


def test_override_and_toml_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nhidden_size = 96\nnum_hidden_layers = 3\n")
    cfg = load_config("tiny", path=f, overrides=["--model.hidden_size=64", "--model.use_qk_norm", "false"])
    assert cfg.model.hidden_size == 64 and cfg.model.num_hidden_layers == 3 and cfg.model.use_qk_norm is False


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config("small", overrides=["--model.rope_theta=10000"])
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    assert load_config(None, path=f) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["--model.hiden_size=3"], "unknown key 'model.hiden_size'"),
    (["--modle.hidden_size=3"], "unknown key 'modle.hidden_size'"),
    (["--model.hidden_size=abc"], "model.hidden_size expects an integer"),
    (["--model.use_qk_norm=maybe"], "model.use_qk_norm expects true or false"),
    (["--model.hidden_size=0"], "model.hidden_size must be >= 1"),
    (["--model.partial_rotary_factor=1.5"], "model.partial_rotary_factor must be in (0, 1]"),
    (["--model.n_group=3"], "num_experts (16) must be divisible by n_group (3)"),
    (["--model.num_key_value_heads=3"], "must be divisible by num_key_value_heads"),
    (["--model.topk_group=8"], "topk_group (8) must be <= n_group"),
    (["--model.num_experts_per_tok=9"], "num_experts_per_tok (9) must be <="),
    (["--model.num_nextn_predict_layers=2"], "must be 0 or 1"),
    (["--model.hidden_size"], "needs a value"),
    (["hidden_size=3"], "cannot read argument"),
    (["--train.compile=true", "--train.recompute=full"], "train.compile cannot be combined with train.recompute=full"),
    (["--data.corpus=wiki"], "data.corpus must be one of stdlib"),
    (["--rl.rollout_engine=paged"], "rl.rollout_engine must be 'static' or 'continuous'"),
    (["--rl.reward_workers=0"], "rl.reward_workers must be >= 1"),
])
def test_bad_overrides_raise_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_toml_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="file not found"):
        load_config("tiny", path=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nx=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("tiny", path=bad)
    bad.write_text("hidden_size = 3\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        load_config("tiny", path=bad)
