"""The Stage-1 trainer on the mini world: it learns, resumes exactly, fails clearly, and scales with DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_lib.train import TrainConfig, TrainingError, latest_checkpoint, read_scalars, train

REPO = Path(__file__).resolve().parents[1]


def quick(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path), caption_eval_n=0, caption_show_n=0, eval_every=0, eval_limit=32,
                batch_size=8, progress=False)
    return TrainConfig.for_profile("mini", **{**base, **kw})


@pytest.mark.slow
def test_short_run_learns(mini_world, tmp_path):
    cfg = quick(tmp_path, max_steps=250, caption_eval_n=25, caption_show_n=2, eval_every=125, batch_size=16)
    result = train(cfg)
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("eval_loss_before", "eval_loss_after", "caption_accuracy_before", "caption_accuracy_after",
                "train_samples_per_s", "steps"):
        assert key in m, key
    assert m["steps"] == 250
    # The projection learns: held-out loss falls clearly from the random projection's ...
    assert m["eval_loss_after"] < 0.5 * m["eval_loss_before"], m
    # ... and captions go from wrong to mostly right (colour and shape of every object, 25 held-out images).
    # A quarter of the mini profile's 1,000 steps; the full run's >= 80% is measured by `bash run.sh`.
    assert m["caption_accuracy_before"] < 0.2, m
    assert m["caption_accuracy_after"] >= m["caption_accuracy_before"] + 0.3, m
    # TensorBoard scalars and caption text are written, and read back for plotting.
    scalars = read_scalars(tmp_path / "tensorboard")
    assert len(scalars["train/loss"]) >= 10 and "eval/loss" in scalars
    assert result.history[-1]["step"] == 250
    assert (tmp_path / "final" / "projection.safetensors").exists()


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(mini_world, tmp_path):
    full = train(quick(tmp_path / "a", max_steps=10, save_every=3, log_every=1))

    def interrupt_at_6(history):
        if history[-1]["step"] == 6:
            raise KeyboardInterrupt

    part = train(quick(tmp_path / "b", max_steps=10, save_every=3, log_every=1), on_log=interrupt_at_6)
    assert part.interrupted and part.history[-1]["step"] == 6
    assert latest_checkpoint(tmp_path / "b").name == "step-000006"
    rest = train(quick(tmp_path / "b", max_steps=10, save_every=3, log_every=1, resume=True))
    a = {h["step"]: h["loss"] for h in full.history}
    b = {h["step"]: h["loss"] for h in rest.history}
    assert sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    from safetensors.torch import load_file
    fa = load_file(str(tmp_path / "a" / "final" / "projection.safetensors"))
    fb = load_file(str(tmp_path / "b" / "final" / "projection.safetensors"))
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(mini_world, tmp_path, monkeypatch):
    from llava_lib.model import llava
    real = llava.LlavaStage1.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 5:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(llava.LlavaStage1, "forward", poisoned)
    with pytest.raises(TrainingError, match="NaN") as e:
        train(quick(tmp_path, max_steps=10, save_every=2))
    assert "step-000004" in str(e.value)
    assert latest_checkpoint(tmp_path).name == "step-000004"


def test_missing_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("LLAVA_LLM_PATH", str(tmp_path / "no_llm"))
    with pytest.raises(Exception) as e:
        train(quick(tmp_path))
    assert "python -m llava_lib.mini build" in str(e.value)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(mini_world, tmp_path):
    common = ["--profile", "mini", "--max-steps", "4", "--batch-size", "4", "--eval-every", "0",
              "--caption-eval-n", "0", "--eval-limit", "8", "--no-tensorboard", "--save-every", "0",
              "--num-workers", "0", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "llava_lib.train", *common, "--grad-accum", "2",
                             "--out", str(tmp_path / "single")], capture_output=True, text=True, timeout=600,
                            env=env, cwd=REPO)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "llava_lib.train", *common, "--grad-accum", "1",
                          "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600, env=env,
                         cwd=REPO)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "single" / "final" / "projection.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "projection.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max())
    ma = json.loads((tmp_path / "single" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert mb["world_size"] == 2 and ma["steps"] == mb["steps"] == 4
