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
