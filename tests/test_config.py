"""Config: recipes, overrides, range checks and actionable errors."""

from __future__ import annotations

import pytest

from gkd.config import ConfigError, GKDConfig, load_config

BASE = ["student=s", "teacher=t"]


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student: s\nteacher: t\nlmbda: 0.25\nbeta: 0.1\n")
    cfg = load_config(recipe, ["beta=0.9", "max_steps=3", "seq_kd=true", "learning_rate=1e-4"])
    assert (cfg.lmbda, cfg.beta, cfg.max_steps, cfg.seq_kd, cfg.learning_rate) == (0.25, 0.9, 3, True, 1e-4)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'lambda'.*did you mean 'lmbda'"):
        load_config(None, [*BASE, "lambda=0.5"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student: s\nteacher: t\nbetta: 0.5\n")
    with pytest.raises(ConfigError, match="'betta'.*did you mean 'beta'"):
        load_config(recipe)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lmbda=1.5", r"lmbda=1.5 must be in \[0, 1\]"),
        ("beta=-0.1", r"beta=-0.1 must be in \[0, 1\]"),
        ("temperature=0", "temperature=0.0 must be > 0"),
        ("loss_temperature=-1", "loss_temperature=-1.0 must be > 0"),
        ("max_new_tokens=0", "max_new_tokens=0 must be > 0"),
        ("divergence=jensen", "divergence='jensen' is not valid; choose one of: forward_kl, jsd"),
        ("reduction=batchmean", "reduction='batchmean' is not valid"),
        ("max_steps=ten", "max_steps='ten' must be an integer"),
        ("seq_kd=maybe", "seq_kd='maybe' must be true or false"),
        ("per_device_batch_size=2.5", "per_device_batch_size=2.5 must be an integer"),
    ],
)
def test_out_of_range_and_wrong_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, override])


def test_teacher_required_unless_pure_sft():
    with pytest.raises(ConfigError, match="teacher is required"):
        load_config(None, ["student=s"])
    cfg = load_config(None, ["student=s", "divergence=kd", "kd_weight=0", "lmbda=0"])
    assert cfg.is_pure_sft


def test_missing_and_invalid_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["lmbda"])


def test_saved_config_round_trips(tmp_path):
    cfg = GKDConfig(student="s", teacher="t", lmbda=1.0, beta=0.0)
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_every_field_has_help():
    text = GKDConfig.help_text()
    for line in text.splitlines():
        assert ": " in line and not line.endswith(": ")
