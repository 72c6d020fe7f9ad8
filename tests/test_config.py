"""The config resolver: profiles, precedence (kwargs > env > file > defaults) and errors that say the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from llava_lib import config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in list(config.ENV_VARS.values()) + ["LLAVA_CONFIG", "LLAVA_HOME"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_mini_is_the_default_profile(tmp_path):
    p = config.resolve()
    assert p.profile == "mini"
    assert p.llm_path == tmp_path / "home" / "mini" / "llm"
    assert p.eval_data_root == tmp_path / "home" / "mini" / "sa1b_eval"


def test_full_profile_defaults(tmp_path):
    p = config.resolve("full")
    assert p.llm_path == tmp_path / "home" / "models" / "Qwen" / "Qwen3-0.6B"
    assert p.eval_data_root is None


def test_precedence_kwargs_over_env_over_file(monkeypatch, tmp_path):
    (tmp_path / "llava.toml").write_text('profile = "full"\nllm_path = "/from/file"\n[full]\nclip_path = "/clip/file"\n',
                                         encoding="utf-8")
    p = config.resolve()
    assert p.profile == "full" and p.llm_path == Path("/from/file") and p.clip_path == Path("/clip/file")
    monkeypatch.setenv("LLAVA_LLM_PATH", "/from/env")
    assert config.resolve().llm_path == Path("/from/env")
    assert config.resolve(llm_path="/from/kwarg").llm_path == Path("/from/kwarg")
    monkeypatch.setenv("LLAVA_PROFILE", "mini")
    assert config.resolve().profile == "mini"
    # the [full] table does not apply to the mini profile
    assert config.resolve().clip_path != Path("/clip/file")


def test_config_file_from_env_and_errors(monkeypatch, tmp_path):
    f = tmp_path / "my.toml"
    f.write_text('data_root = "/d"\n', encoding="utf-8")
    monkeypatch.setenv("LLAVA_CONFIG", str(f))
    assert config.resolve().data_root == Path("/d")
    f.write_text('nonsense_key = 1\n', encoding="utf-8")
    with pytest.raises(config.ConfigError, match="nonsense_key"):
        config.resolve()
    f.write_text('profile = "full\n', encoding="utf-8")
    with pytest.raises(config.ConfigError, match="TOML"):
        config.resolve()
    monkeypatch.setenv("LLAVA_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(config.ConfigError, match="missing.toml"):
        config.resolve()


def test_unknown_profile():
    with pytest.raises(config.ConfigError, match="mini, full"):
        config.resolve("huge")


def test_missing_paths_name_the_path_and_the_command(tmp_path):
    mini = config.resolve("mini")
    with pytest.raises(config.MissingResourceError) as e:
        mini.require("llm_path")
    assert str(mini.llm_path) in str(e.value) and "python -m llava_lib.mini build" in str(e.value)
    full = config.resolve("full")
    with pytest.raises(config.MissingResourceError) as e:
        full.require("clip_path")
    assert "python -m llava_lib.download clip" in str(e.value) and "LLAVA_CLIP_PATH" in str(e.value)
    # a directory without config.json is incomplete, not fine
    full.llm_path.mkdir(parents=True)
    with pytest.raises(config.MissingResourceError, match="config.json"):
        full.require("llm_path")
    (full.llm_path / "config.json").write_text("{}", encoding="utf-8")
    assert config.check_path(full, "llm_path") == full.llm_path
    full.data_root.mkdir(parents=True)
    with pytest.raises(config.MissingResourceError, match="parquet"):
        full.require("data_root")
    with pytest.raises(config.MissingResourceError, match="LLAVA_EVAL_DATA_ROOT"):
        full.require("eval_data_root")


def test_describe_marks_what_exists(tmp_path):
    p = config.resolve()
    p.clip_path.mkdir(parents=True)
    text = p.describe()
    assert "✓ clip_path" in text and "✗ llm_path" in text


def test_llava_toml_at_the_repo_root_is_found_from_notebooks(monkeypatch, tmp_path):
    """A notebook kernel starts in notebooks/: the switch written at the repository root still applies."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "llava.toml").write_text('profile = "full"\n[full]\nbatch_size = 4\n', encoding="utf-8")
    monkeypatch.setattr(config, "repo_root", lambda: repo)
    monkeypatch.chdir(repo / "notebooks")
    assert config.find_config_file() == repo / "llava.toml"
    assert config.resolve().profile == "full"
    cfg = config.TrainConfig.for_profile()
    assert cfg.profile == "full" and cfg.batch_size == 4
    # one line in a notebook still overrides it
    assert config.resolve("mini").profile == "mini"
    assert config.TrainConfig.for_profile("mini").batch_size == config.PROFILE_DEFAULTS["mini"]["batch_size"]


def test_the_environment_switches_the_training_profile_too(monkeypatch):
    monkeypatch.setenv("LLAVA_PROFILE", "full")
    cfg = config.TrainConfig.for_profile()
    assert cfg.profile == "full" and cfg.max_steps is None and cfg.caption_metric is None
    assert cfg.paths.profile == "full"
    monkeypatch.setenv("LLAVA_LLM_PATH", "/models/qwen")
    assert config.TrainConfig.for_profile().paths.llm_path == Path("/models/qwen")


def test_every_config_field_is_a_command_line_flag():
    import argparse
    import dataclasses
    p = argparse.ArgumentParser()
    config.add_config_flags(p)
    dests = {a.dest for a in p._actions}
    assert {f.name for f in dataclasses.fields(config.TrainConfig)} <= dests
    args = p.parse_args(["--profile", "mini", "--max-steps", "7", "--lr", "0.5", "--no-tensorboard",
                         "--gradient-checkpointing", "--projector-type", "mlp2x_gelu", "--limit", "12"])
    cfg = config.config_from_args(args)
    assert (cfg.max_steps, cfg.lr, cfg.tensorboard, cfg.gradient_checkpointing, cfg.projector_type, cfg.limit) == \
        (7, 0.5, False, True, "mlp2x_gelu", 12)
    assert cfg.batch_size == config.PROFILE_DEFAULTS["mini"]["batch_size"]  # unset flags keep the profile's value
    with pytest.raises(SystemExit):
        p.parse_args(["--max-steps", "many"])


def test_unknown_settings_are_refused():
    with pytest.raises(config.ConfigError, match="bacth_size"):
        config.TrainConfig.for_profile("mini", bacth_size=3)


def test_clip_path_accepts_the_modelscope_layout(tmp_path):
    """A directory from `modelscope download` has no config.json; it is a complete Chinese-CLIP all the same."""
    from llava_lib.model.convert_modelscope import MS_VISION_CONFIG
    full = config.resolve("full", clip_path=str(tmp_path / "ms_clip"))
    full.clip_path.mkdir()
    with pytest.raises(config.MissingResourceError, match="ModelScope"):
        full.require("clip_path")
    (full.clip_path / MS_VISION_CONFIG).write_text("{}", encoding="utf-8")
    (full.clip_path / "pytorch_model.bin").write_bytes(b"")
    assert config.check_path(full, "clip_path") == full.clip_path
