"""The mini world: built once, cached, checked by numbers, in the SA1B-Dense-Caption schema."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from llava_lib import config
from llava_lib.mini.build import build as build_mini
from llava_lib.mini.build import url_for
from llava_lib.mini import scenes as sc

REPO = Path(__file__).resolve().parents[1]


def test_check_thresholds(mini_world):
    root, meta = mini_world
    m = meta["metrics"]
    assert m["clip_text_to_image_top1"] >= 0.9, m
    true_loss, shuffled_loss = m["lm_loss_true_vs_shuffled"]
    assert true_loss * 2 < shuffled_loss, m
    assert m["ok"] is True


def test_projection_changes_width_as_in_the_real_model(mini_world):
    """The mini CLIP's patch features are wider than the mini LLM's embeddings (the real pair: 768 -> 1024), so the
    Stage 1 projection really maps one width to another."""
    root, _ = mini_world
    clip = json.loads((root / "clip" / "config.json").read_text(encoding="utf-8"))
    llm = json.loads((root / "llm" / "config.json").read_text(encoding="utf-8"))
    vision = clip["vision_config"]
    assert vision["hidden_size"] != llm["hidden_size"], (vision["hidden_size"], llm["hidden_size"])
    assert (vision["image_size"], vision["patch_size"]) == (224, 16)  # still 1 + 14 x 14 = 197 image tokens


def test_second_build_reuses_the_cache(mini_world):
    root, meta = mini_world
    t = time.time()
    again = build_mini()
    assert time.time() - t < 30
    assert again["metrics"] == meta["metrics"]


def test_a_second_build_waits_for_the_first_and_reuses_it(tmp_path, monkeypatch):
    """Two builds at once (two notebooks): the second waits on the lock, then finds the first one's build.json and
    builds nothing itself. Here the "first build" is the test holding the lock and then writing a finished world."""
    import importlib
    import threading
    from dataclasses import asdict

    from filelock import FileLock

    build_module = importlib.import_module("llava_lib.mini.build")  # the module (the package exports a function)

    def must_not_build(*args):
        raise AssertionError("the waiting build started building")

    monkeypatch.setattr(build_module, "_build_steps", must_not_build)
    root, spec, result = tmp_path / "mini", build_module.BuildSpec(), {}

    def second_build():
        try:
            result["meta"] = build_mini(root, spec)
        except BaseException as e:  # shown by the assertion below
            result["error"] = e

    with FileLock(tmp_path / ".mini.lock"):  # the first build, still running
        waiter = threading.Thread(target=second_build)
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not result  # waiting, not building
        for sub in ("clip", "llm"):
            (root / sub).mkdir(parents=True)
            (root / sub / "config.json").write_text("{}")
        for sub in ("cache/train", "cache/eval"):
            (root / sub).mkdir(parents=True)
        (root / "build.json").write_text(json.dumps({"spec": asdict(spec), "metrics": {"ok": True, "first": 1}}))
    waiter.join(30)
    assert not waiter.is_alive()
    assert result.get("meta", {}).get("metrics") == {"ok": True, "first": 1}, result


@pytest.mark.slow
def test_check_command_prints_one_json_line(mini_world):
    out = subprocess.run([sys.executable, "-m", "llava_lib.mini", "check"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    metrics = json.loads(line)
    assert {"clip_text_to_image_top1", "lm_loss_true_vs_shuffled"} <= set(metrics)
    assert metrics["clip_text_to_image_top1"] >= 0.9
    # The build computed the same numbers in two halves, in two processes (CLIP here, LM beside it).
    root, meta = mini_world
    built = meta["metrics"]
    assert {k: v for k, v in metrics.items() if k != "lm_loss_true_vs_shuffled"} == \
        {k: v for k, v in built.items() if k != "lm_loss_true_vs_shuffled"}
    assert metrics["lm_loss_true_vs_shuffled"] == pytest.approx(built["lm_loss_true_vs_shuffled"], abs=2e-4)


def test_all_three_cap_seg_forms_round_trip_through_the_reader(mini_world):
    from llava_lib.data import read_sa1b
    root, meta = mini_world
    seed = meta["spec"]["seed"]
    scenes = sc.make_scenes(meta["spec"]["n_train"], seed)
    kinds = set()
    for f in sorted((root / "sa1b" / "data").glob("*.parquet")):
        col = pq.read_table(f, columns=["cap_seg"]).column("cap_seg")
        first = col[0].as_py()
        kinds.add("dict" if isinstance(first, dict) else ("json" if first.startswith('{"') else "literal"))
    assert kinds == {"dict", "json", "literal"}
    rows = list(read_sa1b(root / "sa1b"))
    assert [r.caption for r in rows] == [s.caption for s in scenes]
    assert [r.row_id for r in rows] == list(range(len(scenes)))
    assert rows[5].url == url_for("train", 5)


def test_images_match_their_captions_and_urls_are_served_on_loopback(mini_world):
    import requests

    from llava_lib.mini.serve import serving
    root, meta = mini_world
    evals = sc.make_scenes(meta["spec"]["n_eval"], meta["spec"]["seed"] + 1)
    img = Image.open(root / "images" / "eval" / "000000.jpg")
    assert img.size == (224, 224)
    # The pixel at each object's centre has (roughly) that object's colour.
    for o in evals[0].objects:
        if o.shape in ("圆形", "正方形", "菱形"):
            px = img.getpixel((int(o.cx), int(o.cy)))
            assert sum(abs(a - b) for a, b in zip(px, sc.COLORS[o.color])) < 60, (o, px)
    with serving(root) as base:
        r = requests.get(base + "eval/000000.jpg", timeout=10)
        assert r.status_code == 200 and r.content == (root / "images" / "eval" / "000000.jpg").read_bytes()


def test_data_example_is_committed_and_consistent():
    d = REPO / "data_example"
    jpgs = sorted(d.glob("*.jpg"))
    assert [p.name for p in jpgs] == [f"{i:04d}.jpg" for i in range(100)]
    for p in jpgs[:10]:
        assert Image.open(p).size == (224, 224)
        caption = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert 1 <= sum(sc.caption_objects(caption).values()) <= 3, caption


def test_caption_checker():
    ref = "图中有两个物体：左上方是一个红色的圆形，右下方是一个蓝色的星形。"
    assert sc.caption_is_correct("图中有两个物体：左上方是一个红色的圆形，下方是一个蓝色的星形。", ref)
    assert not sc.caption_is_correct("图中有一个物体：左上方是一个红色的圆形。", ref)
    assert not sc.caption_is_correct("图中有两个物体：左上方是一个红色的圆形，右下方是一个蓝色的菱形。", ref)


def test_scenes_are_deterministic():
    a = [s.caption for s in sc.make_scenes(20, 7)]
    b = [s.caption for s in sc.make_scenes(20, 7)]
    assert a == b and len(set(a)) > 10
    assert sc.render(sc.make_scenes(1, 7)[0]).tobytes() == sc.render(sc.make_scenes(1, 7)[0]).tobytes()


def test_mini_profile_resolves_to_the_built_world(mini_world):
    root, _ = mini_world
    p = config.resolve("mini")
    assert p.require("clip_path", "llm_path", "data_root", "eval_data_root").llm_path == root / "llm"


@pytest.mark.slow
def test_mini_llm_answers_after_thinking_with_a_system_prompt(mini_world):
    """What the 01 notebook's chat widget does: a system prompt, thinking on. The mini LM must close its think
    block and then answer (a v8 build without system prompts in its corpus never closed it: an empty answer)."""
    from llava_lib.chat import ChatSession
    from llava_lib.model.loading import build_model
    model, tok = build_model(config.resolve("mini"), device="cpu")
    for question in ("请描述一个简单的场景。", "随便想象一张图片，并描述它。"):
        reply = "".join(ChatSession(model, tok, system="你是一位耐心的中文助教。", enable_thinking=True).stream(question))
        assert "</think>" in reply, reply
        answer = reply.split("</think>", 1)[1]
        assert sc.caption_objects(answer), reply  # a scene with at least one coloured shape
    reply = "".join(ChatSession(model, tok, system="你是一位耐心的中文助教。", enable_thinking=True).stream("你好"))
    assert "</think>" in reply and reply.split("</think>", 1)[1].strip(), reply
