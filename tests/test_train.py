"""The Stage-1 trainer on the mini world: it learns, resumes exactly, fails clearly, and scales with DDP."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_single_and_ddp

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
    run_single_and_ddp(common, tmp_path, 29517)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "single" / "final" / "projection.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "projection.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max())
    ma = json.loads((tmp_path / "single" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert mb["world_size"] == 2 and ma["steps"] == mb["steps"] == 4


def test_checkpoints_hold_any_optimizer_state_and_load_without_running_code(mini_world, tmp_path):
    """The resume state goes through the optimizer's and scheduler's own state_dict(): an optimizer other than
    AdamW round-trips too, and the file loads with ``weights_only=True`` (no pickle code runs)."""
    from llava_lib.train import load_checkpoint, make_scheduler, save_checkpoint, setup, train_step
    cfg = quick(tmp_path, max_steps=20, tensorboard=False)

    def with_sgd(run):
        run.optimizer = torch.optim.SGD(run.model.projector.parameters(), lr=cfg.lr, momentum=0.9)
        run.scheduler = make_scheduler(run.optimizer, run.total_steps, cfg)
        return run

    a = with_sgd(setup(cfg))
    batches = a.batches({"epoch": 0, "batch_in_epoch": 0})
    for _ in range(3):
        train_step(a.model, next(batches), a.optimizer, a.scheduler)
    path = save_checkpoint(tmp_path / "ck", a.model, a.optimizer, a.scheduler,
                           {"step": 3, "epoch": 0, "batch_in_epoch": 3}, keep_last=1)
    saved = torch.load(path / "train_state.pt", weights_only=True)
    assert set(saved) == {"optimizer", "scheduler", "rng"} and saved["scheduler"]["last_epoch"] == 3
    b = with_sgd(setup(cfg))
    state = load_checkpoint(path, b.model, b.optimizer, b.scheduler)
    assert state["batch_in_epoch"] == 3
    for p, q in zip(a.model.projector.parameters(), b.model.projector.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(a.optimizer.state[p]["momentum_buffer"], b.optimizer.state[q]["momentum_buffer"])
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"] != cfg.lr


def test_one_step_changes_only_the_projection(mini_world, tmp_path):
    from llava_lib.train import setup, train_step
    run = setup(quick(tmp_path, max_steps=5, tensorboard=False))
    frozen = {k: v.clone() for k, v in run.model.llm.state_dict().items()}
    frozen.update({f"v.{k}": v.clone() for k, v in run.model.vision.state_dict().items()})
    before = [p.detach().clone() for p in run.model.projector.parameters()]
    rec = train_step(run.model, next(run.batches({"epoch": 0, "batch_in_epoch": 0})), run.optimizer, run.scheduler)
    assert rec["n_tokens"] > 0 and rec["loss"] > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, run.model.projector.parameters()))
    after = {k: v for k, v in run.model.llm.state_dict().items()}
    after.update({f"v.{k}": v for k, v in run.model.vision.state_dict().items()})
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)


def test_a_passed_in_model_must_match_the_config(mini_world, tmp_path):
    from llava_lib.model.loading import build_model
    model, tok = build_model(device="cpu")  # linear projection, last layer
    with pytest.raises(TrainingError, match="projector_type") as e:
        train(quick(tmp_path, max_steps=1, projector_type="mlp2x_gelu"), model=model, tokenizer=tok)
    assert "mlp2x_gelu" in str(e.value) and "linear" in str(e.value)
    with pytest.raises(TrainingError, match="feature_layer"):
        train(quick(tmp_path, max_steps=1, feature_layer=-2), model=model, tokenizer=tok)


def test_the_core_does_not_know_the_mini_world():
    """model/, train, chat and process never import llava_lib.mini; the mini profile plugs in by name."""
    code = ("import sys, llava_lib.train, llava_lib.chat, llava_lib.process, llava_lib.model, "
            "llava_lib.model.loading, llava_lib.model.accel\n"
            "print(sorted(m for m in sys.modules if m.startswith('llava_lib.mini')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    sources = [REPO / "llava_lib" / f for f in ("train.py", "chat.py", "process.py")]
    sources += sorted((REPO / "llava_lib" / "model").glob("*.py"))
    for f in sources:
        text = f.read_text(encoding="utf-8")
        assert "from .mini" not in text and "from ..mini" not in text and "import llava_lib.mini" not in text, f


def test_load_trained_rebuilds_the_projector_the_checkpoint_was_trained_with(mini_world, tmp_path):
    from llava_lib.model.checkpoint import save_projection
    from llava_lib.model.loading import build_model, load_trained
    torch.manual_seed(3)
    model, _ = build_model(device="cpu", projector_type="mlp2x_gelu", feature_layer=-2)
    save_projection(tmp_path / "final", model, {"step": 5})
    again, tok, meta = load_trained(tmp_path / "final", device="cpu")
    assert (again.projector_type, again.vision.feature_layer, meta["step"]) == ("mlp2x_gelu", -2, 5)
    for a, b in zip(model.projector.parameters(), again.projector.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="projection.json"):
        load_trained(tmp_path, device="cpu")


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    """A run of 2 steps ends its cosine at lr 0; resumed with --max-steps 3, step 3 must use the 3-step schedule's
    lr, not the 0 saved with the 2-step one (it would silently train nothing). Same settings: the same lr, exactly."""
    from conftest import tiny_llava

    from llava_lib.train import load_checkpoint, lr_at, make_scheduler, save_checkpoint
    cfg = TrainConfig.for_profile("mini", max_steps=2)

    def fresh(total):
        model = tiny_llava(None)
        opt = torch.optim.AdamW(model.projector.parameters(), lr=cfg.lr)
        return model, opt, make_scheduler(opt, total, cfg)

    model, opt, sched = fresh(2)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    path = save_checkpoint(tmp_path, model, opt, sched, {"step": 2, "epoch": 0, "batch_in_epoch": 2})
    _, opt3, sched3 = fresh(3)
    load_checkpoint(path, model, opt3, sched3)
    assert opt3.param_groups[0]["lr"] == pytest.approx(lr_at(2, 3, cfg)) and lr_at(2, 3, cfg) > 0
    _, opt2, sched2 = fresh(2)
    load_checkpoint(path, model, opt2, sched2)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_the_progress_bar_counts_steps_not_log_lines(mini_world, tmp_path, capsys):
    """The bar is moved only every ``log_every`` steps, but it must show the step number itself."""
    train(quick(tmp_path, max_steps=20, log_every=10, progress=True, tensorboard=False, save_every=0))
    err = capsys.readouterr().err
    assert "20/20" in err and "2/20" not in err.replace("20/20", ""), err[-500:]
