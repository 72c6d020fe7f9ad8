"""Finding trained runs for the chat notebook: command-line and notebook runs, any profile, newest first."""
from __future__ import annotations

import json
import os

from llava_lib.model.checkpoint import META, WEIGHTS, list_runs


def _fake_run(root, name, profile, step, mtime, with_config=True):
    final = root / name / "final"
    final.mkdir(parents=True)
    (final / META).write_text(json.dumps({"projector_type": "linear", "step": step}), encoding="utf-8")
    (final / WEIGHTS).write_bytes(b"x")
    os.utime(final / WEIGHTS, (mtime, mtime))
    if with_config:
        (root / name / "config.json").write_text(json.dumps({"profile": profile}), encoding="utf-8")
        (root / name / "metrics.json").write_text(json.dumps({"caption_accuracy_after": 0.9}), encoding="utf-8")


def test_runs_are_listed_newest_first_with_their_profile(tmp_path):
    _fake_run(tmp_path, "stage1-mini", "mini", 1000, 1_000)
    _fake_run(tmp_path, "stage1-mini-notebook", "mini", 250, 3_000)
    _fake_run(tmp_path, "stage1-full", "full", 6250, 2_000)
    _fake_run(tmp_path, "interrupted", None, 7, 4_000, with_config=False)
    (tmp_path / "no-final" / "checkpoints").mkdir(parents=True)  # a run that never finished is not offered
    runs = list_runs(tmp_path)
    assert [r["name"] for r in runs] == ["interrupted", "stage1-mini-notebook", "stage1-full", "stage1-mini"]
    assert [r["profile"] for r in runs] == [None, "mini", "full", "mini"]
    assert runs[1]["steps"] == 250 and runs[1]["projection"] == tmp_path / "stage1-mini-notebook" / "final"
    assert runs[1]["metrics"] == {"caption_accuracy_after": 0.9} and runs[0]["metrics"] == {}
    assert list_runs(tmp_path / "missing") == []
