"""ModelScope download helpers, without the network: modelscope's functions are replaced by fakes."""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch

import modelscope
from llava_lib import config
from llava_lib import download as dl

# What the fake dataset repo holds (names as the real SA1B-Dense-Caption shards are reported to be named).
FAKE_DATASET_FILES = [f"data/train-{i:04d}-of-0724-{i:03x}abc.parquet" for i in range(13)] + ["README.md"]


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    """Default destinations under tmp_path; no llava.toml, no LLAVA_* from the caller's shell."""
    for var in list(config.ENV_VARS.values()) + ["LLAVA_CONFIG"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _forbid_hub(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the hub must not be called when the local copy is complete")

    monkeypatch.setattr(modelscope, "snapshot_download", boom)
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", boom)


def _offline(monkeypatch, exc: Exception):
    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(modelscope, "snapshot_download", fail)
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", fail)


def _network_errors():
    import requests
    from modelscope_hub.errors import NetworkError

    return [
        ConnectionError("Failed to resolve 'modelscope.cn'"),
        NetworkError("[E1020] Connection failed"),
        requests.exceptions.ConnectionError("Max retries exceeded"),
        requests.exceptions.ReadTimeout("Read timed out"),
    ]


# --------------------------------------------------------------------------------------- offline


@pytest.mark.parametrize("exc", _network_errors(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    "job, repo_id, env",
    [
        (dl.download_llm, config.LLM_MODEL_ID, "LLAVA_LLM_PATH"),
        (dl.download_clip, config.CLIP_MODEL_ID, "LLAVA_CLIP_PATH"),
        (dl.download_data, config.DATASET_ID, "LLAVA_DATA_ROOT"),
    ],
    ids=["llm", "clip", "data"],
)
def test_offline_error_names_id_destination_and_fix(monkeypatch, tmp_path, job, repo_id, env, exc):
    _offline(monkeypatch, exc)
    dest = tmp_path / "dest"
    with pytest.raises(dl.DownloadError) as e:
        job(dest)
    msg = str(e.value)
    assert repo_id in msg and env in msg and "网络" in msg
    assert str(dest) in msg or str(dest.with_name("dest-modelscope")) in msg  # clip downloads beside dest
    assert isinstance(e.value.__cause__, type(exc))


def test_not_found_is_told_apart_from_offline(monkeypatch, tmp_path):
    import requests

    _offline(monkeypatch, requests.exceptions.HTTPError("404 Client Error"))
    with pytest.raises(dl.DownloadError, match="找不到"):
        dl.download_llm(tmp_path / "llm")


def test_cli_reports_offline_in_chinese_and_exits_1(monkeypatch, tmp_path, capsys):
    _offline(monkeypatch, ConnectionError("no route to host"))
    assert dl.main(["llm", "--dest", str(tmp_path / "llm")]) == 1
    err = capsys.readouterr().err
    assert "错误" in err and config.LLM_MODEL_ID in err and str(tmp_path / "llm") in err


# ---------------------------------------------------------------------------------------- caches


def _fake_qwen_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (d / name).write_text("{}")
    return d


def test_complete_llm_dir_returns_without_network(monkeypatch, tmp_path, capsys):
    _forbid_hub(monkeypatch)
    d = _fake_qwen_dir(tmp_path / "qwen")
    assert dl.download_llm(d) == d
    assert "无需下载" in capsys.readouterr().out


def test_llm_completeness_follows_the_shard_index(tmp_path):
    d = _fake_qwen_dir(tmp_path / "qwen")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    (d / "m-1.safetensors").write_text("")
    assert not dl.llm_is_complete(d)
    (d / "m-2.safetensors").write_text("")
    assert dl.llm_is_complete(d)


def test_complete_converted_clip_dir_returns_without_network(monkeypatch, tmp_path, capsys):
    _forbid_hub(monkeypatch)
    d = tmp_path / "clip"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "chinese_clip"}))
    (d / "model.safetensors").write_text("")
    (d / "processor_config.json").write_text("{}")
    assert dl.download_clip(d) == d
    assert "无需下载" in capsys.readouterr().out


def test_data_dir_with_the_first_shards_returns_without_network(monkeypatch, tmp_path):
    _forbid_hub(monkeypatch)
    d = tmp_path / "sa1b"
    (d / "data").mkdir(parents=True)
    for f in FAKE_DATASET_FILES[:3]:
        (d / f).write_text("")
    assert dl.download_data(d, limit_shards=3) == d
    assert dl.data_is_complete(d, 2)
    assert not dl.data_is_complete(d, 4)
    assert not dl.data_is_complete(d, 0)  # "all shards" is only known from a finished download


def test_default_destinations_come_from_the_full_profile(monkeypatch):
    seen = {}

    def fake(*a, **k):
        seen.update(k)
        raise ConnectionError("offline")

    monkeypatch.setattr(modelscope, "snapshot_download", fake)
    with pytest.raises(dl.DownloadError):
        dl.download_llm()
    assert Path(seen["local_dir"]) == config.resolve("full").llm_path
    assert seen["model_id"] == config.LLM_MODEL_ID


# ------------------------------------------------------------------------------- fake successful hub


def _fake_dataset_hub(calls: list):
    def fake(dataset_id=None, local_dir=None, allow_patterns=None, **kw):
        calls.append(dict(dataset_id=dataset_id, local_dir=local_dir, allow_patterns=allow_patterns))
        for f in FAKE_DATASET_FILES:
            if allow_patterns is None or any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                (Path(local_dir) / f).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / f).write_bytes(b"PAR1")
        return local_dir

    return fake


def test_data_downloads_only_the_first_n_shards_then_caches(monkeypatch, tmp_path, capsys):
    calls: list = []
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", _fake_dataset_hub(calls))
    d = tmp_path / "sa1b"
    assert dl.main(["data", "--limit-shards", "2", "--dest", str(d)]) == 0
    assert calls[0]["dataset_id"] == config.DATASET_ID and Path(calls[0]["local_dir"]) == d
    assert sorted(p.name for p in (d / "data").glob("*.parquet")) == [Path(f).name for f in FAKE_DATASET_FILES[:2]]
    marker = json.loads((d / dl.DATA_MARKER).read_text(encoding="utf-8"))
    assert marker["limit_shards"] == 2 and len(marker["files"]) == 2
    assert "下载" in capsys.readouterr().out
    # the config check the notebooks use now passes for this directory
    config.check_path(config.resolve("full", data_root=d), "data_root")

    _forbid_hub(monkeypatch)
    assert dl.download_data(d, limit_shards=2) == d
    assert dl.download_data(d, limit_shards=1) == d


def test_all_shards_and_then_cached_from_the_marker(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", _fake_dataset_hub(calls))
    d = tmp_path / "sa1b"
    dl.download_data(d, limit_shards=0)
    assert len(list((d / "data").glob("*.parquet"))) == 13
    _forbid_hub(monkeypatch)
    dl.download_data(d, limit_shards=0)
    dl.download_data(d, limit_shards=5)


def test_data_download_with_no_matching_shards_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", lambda **k: k["local_dir"])
    with pytest.raises(dl.DownloadError, match="parquet"):
        dl.download_data(tmp_path / "sa1b", limit_shards=2)


def test_shard_patterns_pick_exactly_the_first_n():
    pats = dl.shard_patterns(10)
    names = [f"data/train-{i:04d}-of-0724-x.parquet" for i in range(724)]
    picked = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    assert picked == names[:10]
    five = [f"data/train-{i:05d}-of-00724.parquet" for i in range(20)]
    assert [n for n in five if any(fnmatch.fnmatch(n, p) for p in pats)] == five[:10]


def _write_small_modelscope_clip(local_dir: Path) -> None:
    """What ModelScope's hub would put into local_dir, at a tiny size."""
    ms_clip = pytest.importorskip("modelscope.models.multi_modal.clip.model")

    class Tok:
        vocab = {"[PAD]": 0}

    vision = dict(embed_dim=16, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=16)
    text = dict(vocab_size=40, text_attention_probs_dropout_prob=0.1, text_hidden_act="gelu",
                text_hidden_dropout_prob=0.1, text_hidden_size=32, text_initializer_range=0.02,
                text_intermediate_size=64, text_max_position_embeddings=16, text_num_attention_heads=2,
                text_num_hidden_layers=1, text_type_vocab_size=2)
    torch.manual_seed(0)
    model = ms_clip.CLIP(**vision, **text, tokenizer=Tok())
    local_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, local_dir / "pytorch_model.bin")
    (local_dir / "vision_model_config.json").write_text(json.dumps(vision))
    (local_dir / "text_model_config.json").write_text(json.dumps(text))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(0x4E00 + i) for i in range(35)]
    (local_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")


def test_clip_download_converts_to_a_transformers_dir(monkeypatch):
    from llava_lib.model import convert_modelscope as cm

    calls = []

    def fake(model_id=None, local_dir=None, **kw):
        calls.append((model_id, local_dir))
        _write_small_modelscope_clip(Path(local_dir))
        return local_dir

    monkeypatch.setattr(modelscope, "snapshot_download", fake)
    assert dl.main(["clip"]) == 0
    clip_path = config.resolve("full").clip_path
    assert calls == [(config.CLIP_MODEL_ID, str(clip_path.with_name(clip_path.name + "-modelscope")))]
    assert cm.is_converted_dir(clip_path)
    config.check_path(config.resolve("full"), "clip_path")
    assert cm.load_chinese_clip(clip_path).config.projection_dim == 16

    _forbid_hub(monkeypatch)  # second run: nothing to do
    assert dl.main(["clip"]) == 0


def test_clip_dir_holding_the_modelscope_layout_is_converted_in_place(monkeypatch, tmp_path):
    from llava_lib.model import convert_modelscope as cm

    _forbid_hub(monkeypatch)
    d = tmp_path / "clip"
    _write_small_modelscope_clip(d)  # e.g. `modelscope download --local_dir <clip_path>` by hand
    assert dl.download_clip(d) == d
    assert cm.is_converted_dir(d) and cm.is_modelscope_layout(tmp_path / "clip-modelscope")


def test_sft_download_unpacks_an_archive_and_finds_the_conversation_folders(monkeypatch, tmp_path, capsys):
    """The hub may ship CogVLM-SFT-311K as an archive with a top-level folder: it is unpacked once, the folder that
    holds both conversation subsets is returned, and a second call needs no network."""
    import shutil

    from llava_lib.data.conversations import LABELS_DIR, SFT_SUBSETS
    staging = tmp_path / "staging" / "CogVLM-SFT-311K"
    for subset in SFT_SUBSETS:
        (staging / subset / "images").mkdir(parents=True)
        (staging / subset / LABELS_DIR).mkdir(parents=True)
        (staging / subset / LABELS_DIR / "00000001.json").write_text('{"conversations": []}', encoding="utf-8")
    archive = shutil.make_archive(str(tmp_path / "CogVLM-SFT-311K"), "zip", staging.parent)
    calls = []

    def fake(**kw):
        calls.append(kw["dataset_id"])
        shutil.copy(archive, Path(kw["local_dir"]) / "CogVLM-SFT-311K.zip")
        return kw["local_dir"]

    monkeypatch.setattr(modelscope, "dataset_snapshot_download", fake)
    dest = tmp_path / "sft"
    found = dl.download_sft(dest)
    assert calls == ["ZhipuAI/CogVLM-SFT-311K"] and found == dest / "CogVLM-SFT-311K"
    assert "LLAVA_SFT_ROOT" in capsys.readouterr().out  # the data is one level down: say where to point
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", lambda **kw: pytest.fail("network used"))
    assert dl.download_sft(dest) == found


def test_sft_download_without_the_folders_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", lambda **k: k["local_dir"])
    with pytest.raises(dl.DownloadError, match="labels_zh"):
        dl.download_sft(tmp_path / "sft")
