"""Stage 1 training: only the projection learns; everything else is frozen.

``train(TrainConfig(...))`` is what the notebook calls; ``llava-train`` (``python -m llava_lib.train``) is the
same function from a terminal, and under ``torchrun --nproc_per_node N`` it runs DDP (only the projection's
gradients are reduced; each rank reads its own batches; rank 0 evaluates, logs and saves).

The loop, in one breath: take ``grad_accum`` batches -> count their label tokens (over all ranks) -> for each,
loss_sum / total_tokens -> backward into the projection -> one AdamW step with a cosine learning rate -> every
``eval_every`` steps an eval (loss, perplexity, a few captions) and every ``save_every`` steps a checkpoint that
``resume=True`` continues from exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import config as cfg_mod
from .model.checkpoint import atomic_write_json, save_projection

PROFILE_DEFAULTS = {
    # The course's real run: first 100,000 samples, batch 16, lr 2e-3, cosine with 3% warmup.
    "full": dict(),
    # The mini world: small enough for two CPU cores, long enough to really learn. lr 1e-2, not 2e-3: a small
    # 64 -> 64 projection and a short run (measured on one build, 500 steps: caption accuracy 0.77 at lr 3e-3,
    # 0.88 at 1e-2, no better at 2e-2; on the final v8 build, lr 1e-2: 0.82 after 500 steps, 0.98 after 1,000).
    "mini": dict(limit=None, epochs=10, max_steps=1000, batch_size=16, lr=1e-2, eval_every=250, save_every=250,
                 caption_eval_n=100, eval_limit=200, num_workers=0),
}


@dataclass
class TrainConfig:
    profile: str = "mini"
    out_dir: str | None = None            # default: <checkpoints>/stage1-<profile>
    # data
    limit: int | None = 100_000           # first N training samples
    eval_limit: int = 200                 # eval samples (held-out split, or the tail of the train cache)
    max_text_tokens: int = 128
    group_by_length: bool = True
    num_workers: int = 2
    # optimisation (the course's defaults)
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None          # stops early when set
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    # model
    projector_type: str = "linear"
    feature_layer: int = -1
    gradient_checkpointing: bool = False
    accelerate: bool | None = None        # torch.compile of the frozen LLM's layers; None = on for CUDA
    # bookkeeping
    eval_every: int = 500
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    caption_eval_n: int = 0               # eval images captioned for accuracy (mini world only)
    caption_show_n: int = 4               # captions shown next to their references at each eval
    seed: int = 42
    device: str | None = None
    resume: bool = False
    tensorboard: bool = True
    progress: bool = True

    @classmethod
    def for_profile(cls, profile: str = "mini", **overrides) -> "TrainConfig":
        if profile not in PROFILE_DEFAULTS:
            raise cfg_mod.ConfigError(f"未知的配置档 {profile!r}；可选：{', '.join(PROFILE_DEFAULTS)}")
        return cls(profile=profile, **{**PROFILE_DEFAULTS[profile], **overrides})


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, out of memory, bad data); the message says what to change."""


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict]
    metrics: dict = field(default_factory=dict)
    interrupted: bool = False


# --------------------------------------------------------------------------------------------- helpers
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine down to ``min_lr_ratio * lr``."""
    warm = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _dist():
    """(rank, world_size, is_distributed) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, world > 1


def _all_reduce_sum(x: float | int, device) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def _label_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum()) if batch["labels"].numel() else 0


def _batch_loss_sum(model, batch, device, autocast):
    with autocast():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], pixel_values=batch["pixel_values"])
    return out.loss * out.n_label_tokens, out.n_label_tokens


# ----------------------------------------------------------------------------------------- checkpoints
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def save_checkpoint(ckpt_dir: Path, model, optimizer, state: dict, keep_last: int) -> Path:
    """Projection + resume state (optimizer moments, RNG, position) in ``ckpt_dir/step-NNNNNN``; no pickle.

    Written into a temp folder and renamed, then ``latest.json`` is atomically pointed at it; a run killed at
    any moment leaves the previous checkpoint intact.
    """
    name = f"step-{state['step']:06d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_projection(tmp, _unwrap(model), {"step": state["step"]})
    tensors = {"rng.torch": torch.get_rng_state()}
    params = [p for p in _unwrap(model).projector.parameters()]
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt.{i}.{k}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1).cpu()
    save_file(tensors, str(tmp / STATE_TENSORS))
    atomic_write_json(tmp / STATE_JSON, state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_json(ckpt_dir / "latest.json", {"checkpoint": name, "step": state["step"]})
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    f = Path(out_dir) / "checkpoints" / "latest.json"
    if not f.exists():
        return None
    p = f.parent / json.loads(f.read_text(encoding="utf-8"))["checkpoint"]
    return p if p.exists() else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    from .model.checkpoint import load_projection
    load_projection(path, _unwrap(model))
    tensors = load_file(str(path / STATE_TENSORS))
    params = list(_unwrap(model).projector.parameters())
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": torch.tensor(float(tensors[f"opt.{i}.step"][0])),
                "exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device),
            }
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads((path / STATE_JSON).read_text(encoding="utf-8"))


def _unwrap(model):
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate_loss(model, loader, device, autocast) -> float:
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        if batch["input_ids"].numel() == 0:
            continue
        s, k = _batch_loss_sum(model, batch, device, autocast)
        total += float(s)
        n += k
    model.train()
    return total / max(n, 1)


@torch.no_grad()
def generate_captions(model, tokenizer, dataset, indices, max_new_tokens: int = 48) -> list[tuple[str, str]]:
    """(generated, reference) for the given eval samples, greedy."""
    from .chat import caption
    model.eval()
    out = [(caption(model, tokenizer, dataset.image(i), max_new_tokens=max_new_tokens), dataset.captions[i])
           for i in indices]
    model.train()
    return out


def caption_accuracy(pairs) -> float | None:
    """Share of captions naming every object's colour and shape (mini world; None elsewhere)."""
    from .mini.scenes import caption_is_correct  # pure helpers; the only place the trainer knows the mini world
    return float(np.mean([caption_is_correct(g, r) for g, r in pairs])) if pairs else None


# ---------------------------------------------------------------------------------------------- data
def _datasets(paths: cfg_mod.Paths, cfg: TrainConfig):
    from torch.utils.data import Subset

    from .data import CachedImageDataset
    train_dir = Path(paths.cache_dir) / "train"
    eval_dir = Path(paths.cache_dir) / "eval"
    if not train_dir.exists():
        raise cfg_mod.MissingResourceError(
            f"找不到训练图片缓存：{train_dir}\n  解决办法：运行 `{cfg_mod.how_to_get(paths, 'cache_dir')}`。")
    train = CachedImageDataset(train_dir)
    if eval_dir.exists():
        ev = CachedImageDataset(eval_dir)
        eval_idx = list(range(min(cfg.eval_limit, len(ev))))
    else:  # hold out the tail of the train cache
        ev = train
        eval_idx = list(range(max(0, len(train) - cfg.eval_limit), len(train)))
    n_train = len(train) if ev is not train else len(train) - len(eval_idx)
    if cfg.limit is not None:
        n_train = min(n_train, cfg.limit)
    if n_train <= 0:
        raise TrainingError("训练集为空：请检查 limit / eval_limit 和图片缓存。")
    return train, list(range(n_train)), ev, eval_idx, Subset


def _autocast(device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext


# ---------------------------------------------------------------------------------------------- train
def train(config: TrainConfig | None = None, on_log=None, model=None, tokenizer=None) -> TrainResult:
    """Run Stage 1. ``on_log(history)`` is called after every logged step (the notebook's live plot).

    Ctrl-C (KeyboardInterrupt) saves a checkpoint and returns what was trained so far.
    """
    cfg = config or TrainConfig.for_profile("mini")
    rank, world, distributed = _dist()
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    device = torch.device(cfg.device) if cfg.device else (
        torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0
    paths = cfg_mod.resolve(cfg.profile)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(paths.checkpoints_dir) / f"stage1-{cfg.profile}"
    ckpt_dir = out_dir / "checkpoints"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    if model is None:
        from .model.loading import build_model
        model, tokenizer = build_model(paths, device=device, projector_type=cfg.projector_type,
                                       feature_layer=cfg.feature_layer)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.accelerate or (cfg.accelerate is None and device.type == "cuda"):
        from .model.accel import accelerate_training
        accelerate_training(model)  # measured in benchmarks/train_step.py and docs/perf_notes.md
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Only the projection is wrapped: its gradients are the only ones, and the only ones reduced.
        model.projector = DDP(model.projector, device_ids=[device.index] if device.type == "cuda" else None)

    from torch.utils.data import DataLoader

    from .data import LengthGroupedSampler, make_collate
    train_ds, train_idx, eval_ds, eval_idx, Subset = _datasets(paths, cfg)
    collate = make_collate(tokenizer, model.num_image_tokens, cfg.max_text_tokens)
    train_view = Subset(train_ds, train_idx)
    sampler = LengthGroupedSampler([int(train_ds.lengths[i]) for i in train_idx], cfg.batch_size, seed=cfg.seed,
                                   group_by_length=cfg.group_by_length, rank=rank, world_size=world,
                                   drop_last=distributed)
    steps_per_epoch = len(sampler.batches()) // cfg.grad_accum
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps) if steps_per_epoch else cfg.max_steps
    if total_steps <= 0:
        raise TrainingError(f"没有可训练的步数：每轮 {steps_per_epoch} 步。请减小 batch_size 或 grad_accum。")

    def loader_for(epoch: int, start_batch: int):
        sampler.set_epoch(epoch, start_batch)
        return DataLoader(train_view, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                          persistent_workers=False)

    eval_loader = DataLoader(Subset(eval_ds, eval_idx), batch_size=cfg.batch_size, collate_fn=collate,
                             num_workers=cfg.num_workers)
    params = list(_unwrap(model).projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    autocast = _autocast(device)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "eval_history": [], "metrics": {}}
    if cfg.resume:
        last = latest_checkpoint(out_dir)
        if last is None:
            if is_main:
                print(f"[train] {ckpt_dir} 中没有检查点，从头开始训练。")
        else:
            state = load_checkpoint(last, model, optimizer)
            if is_main:
                print(f"[train] 从检查点 {last} 继续（第 {state['step']} 步）。")

    writer = None
    if is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "tensorboard"))

    show_idx = eval_idx[:cfg.caption_show_n]
    acc_idx = eval_idx[:cfg.caption_eval_n]

    def run_eval(step: int, tag: str) -> dict:
        loss = evaluate_loss(model, eval_loader, device, autocast)
        rec = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
        if is_main and show_idx:
            pairs = generate_captions(model, tokenizer, eval_ds, show_idx)
            rec["captions"] = pairs
            if writer:
                table = "| 生成 | 参考 |\n|---|---|\n" + "\n".join(f"| {g} | {r} |" for g, r in pairs)
                writer.add_text("eval/captions", table, step)
        if writer:
            writer.add_scalar("eval/loss", loss, step)
            writer.add_scalar("eval/ppl", rec["eval_ppl"], step)
        if is_main:
            print(f"[train] {tag}第 {step} 步评估：loss {loss:.4f}  ppl {rec['eval_ppl']:.2f}")
        return rec

    metrics = state["metrics"]
    if state["step"] == 0 and is_main:
        metrics["eval_loss_before"] = run_eval(0, "训练前 ")["eval_loss"]
        if acc_idx and cfg.profile == "mini":
            metrics["caption_accuracy_before"] = caption_accuracy(generate_captions(model, tokenizer, eval_ds, acc_idx))
            print(f"[train] 训练前描述准确率：{metrics['caption_accuracy_before']:.2%}")
    model.train()

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=state["step"], desc="Stage 1 训练", disable=not (is_main and cfg.progress),
               dynamic_ncols=True)
    history = state["history"]
    interrupted = False
    t_start, samples_seen, data_wait = time.time(), 0, 0.0
    epoch, batch_in_epoch = state["epoch"], state["batch_in_epoch"]
    it = iter(loader_for(epoch, batch_in_epoch))
    try:
        while state["step"] < total_steps:
            t0 = time.time()
            micro = []
            while len(micro) < cfg.grad_accum:
                try:
                    b = next(it)
                except StopIteration:
                    epoch, batch_in_epoch = epoch + 1, 0
                    it = iter(loader_for(epoch, 0))
                    continue
                batch_in_epoch += 1
                if b["skipped"] and is_main:
                    print(f"[train] 跳过 {len(b['skipped'])} 个无法读取的样本：{b['skipped'][0].message}")
                if b["input_ids"].numel():
                    micro.append(b)
            t_data = time.time() - t0
            data_wait += t_data
            step = state["step"]
            lr = lr_at(step, total_steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            n_total = _all_reduce_sum(sum(_label_tokens(b) for b in micro), device)
            loss_total = 0.0
            for k, b in enumerate(micro):
                sync = k == len(micro) - 1
                ctx = model.projector.no_sync() if (distributed and not sync) else _null()
                with ctx:
                    loss_sum, _ = _batch_loss_sum(model, b, device, autocast)
                    # Normalise by the global token count; DDP's gradient averaging is undone by * world.
                    (loss_sum * world / max(n_total, 1.0)).backward()
                loss_total += float(loss_sum.detach())
            loss_value = _all_reduce_sum(loss_total, device) / max(n_total, 1.0)
            if not math.isfinite(loss_value):
                last = latest_checkpoint(out_dir)
                raise TrainingError(
                    f"第 {step} 步的损失是 {loss_value}（NaN/inf），训练已停止。最后一个完好的检查点："
                    f"{last or '（尚无）'}。可以降低学习率（lr，当前 {cfg.lr}）后用 resume=True 继续。")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            n_samples = sum(b["input_ids"].shape[0] for b in micro) * world
            samples_seen += n_samples
            elapsed = time.time() - t_start
            rec = {"step": state["step"], "loss": loss_value, "ppl": math.exp(min(loss_value, 50)), "lr": lr,
                   "samples_per_s": samples_seen / max(elapsed, 1e-9), "data_wait_frac": data_wait / max(elapsed, 1e-9)}
            history.append(rec)
            bar.update(1)
            if is_main and (state["step"] % cfg.log_every == 0 or state["step"] == total_steps):
                bar.set_postfix(loss=f"{loss_value:.3f}", ppl=f"{rec['ppl']:.1f}", lr=f"{lr:.2e}",
                                sps=f"{rec['samples_per_s']:.1f}")
                if writer:
                    for k in ("loss", "ppl", "lr"):
                        writer.add_scalar(f"train/{k}", rec[k], state["step"])
                    writer.add_scalar("perf/samples_per_s", rec["samples_per_s"], state["step"])
                    writer.add_scalar("perf/data_wait_frac", rec["data_wait_frac"], state["step"])
                if on_log:
                    on_log(history)
            state["epoch"], state["batch_in_epoch"] = epoch, batch_in_epoch
            done = state["step"] == total_steps
            if cfg.eval_every and (state["step"] % cfg.eval_every == 0) and not done:
                state["eval_history"].append(run_eval(state["step"], ""))
            if is_main and cfg.save_every and state["step"] % cfg.save_every == 0 and not done:
                save_checkpoint(ckpt_dir, model, optimizer, _json_state(state, metrics), cfg.keep_last)
    except KeyboardInterrupt:
        interrupted = True
        if is_main:
            state["epoch"], state["batch_in_epoch"] = epoch, batch_in_epoch
            p = save_checkpoint(ckpt_dir, model, optimizer, _json_state(state, metrics), cfg.keep_last)
            print(f"\n[train] 已中断：检查点保存在 {p}；用 resume=True 可以从这里继续。")
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            "显存不足（CUDA out of memory）。可以调小 batch_size（当前 "
            f"{cfg.batch_size}，可配合 grad_accum 保持等效批量）、调小 max_text_tokens（当前 {cfg.max_text_tokens}），"
            "或打开 gradient_checkpointing=True。") from e
    finally:
        bar.close()

    elapsed = time.time() - t_start
    if not interrupted:
        final = run_eval(state["step"], "训练后 ")
        state["eval_history"].append(final)
        if is_main:
            metrics["eval_loss_after"] = final["eval_loss"]
            if acc_idx and cfg.profile == "mini":
                metrics["caption_accuracy_after"] = caption_accuracy(
                    generate_captions(model, tokenizer, eval_ds, acc_idx))
                print(f"[train] 训练后描述准确率：{metrics['caption_accuracy_after']:.2%}")
            metrics.update(
                steps=state["step"], train_samples_per_s=samples_seen / max(elapsed, 1e-9),
                data_wait_fraction=data_wait / max(elapsed, 1e-9), wall_seconds=elapsed, world_size=world,
                device=str(device), attention=_unwrap(model).llm.config._attn_implementation,
                eval_ppl_before=math.exp(min(metrics.get("eval_loss_before", 50), 50)),
                eval_ppl_after=final["eval_ppl"])
            save_projection(out_dir / "final", _unwrap(model), {"step": state["step"]})
            save_checkpoint(ckpt_dir, model, optimizer, _json_state(state, metrics), cfg.keep_last)
            atomic_write_json(out_dir / "metrics.json", metrics)
            atomic_write_json(out_dir / "config.json", dataclasses.asdict(cfg))
    if writer:
        writer.close()
    if distributed:
        torch.distributed.barrier()
        _unwrap_projector(model)
    return TrainResult(out_dir, history, metrics, interrupted)


def _unwrap_projector(model):
    if hasattr(model.projector, "module"):
        model.projector = model.projector.module


def _null():
    import contextlib
    return contextlib.nullcontext()


def _json_state(state: dict, metrics: dict) -> dict:
    return {"step": state["step"], "epoch": state["epoch"], "batch_in_epoch": state["batch_in_epoch"],
            "history": state["history"], "eval_history": [
                {k: v for k, v in e.items()} for e in state["eval_history"]], "metrics": metrics}


# ---------------------------------------------------------------------------------------------- logs
def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars back as ``{tag: [(step, value), ...]}`` (for a matplotlib plot)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-train", description="LLaVA Stage 1 训练：只训练投影层，视觉塔与 LLM 冻结。")
    p.add_argument("--profile", default="mini", choices=list(PROFILE_DEFAULTS), help="mini（迷你世界）或 full（真实模型）")
    p.add_argument("--out", dest="out_dir", default=None, help="输出目录（默认 checkpoints/stage1-<profile>）")
    p.add_argument("--resume", action="store_true", help="从输出目录中最后一个检查点继续")
    helps = {"limit": "只用前 N 个训练样本", "batch_size": "每步（每个进程）的批量大小", "lr": "学习率",
             "max_steps": "最多训练多少步", "epochs": "训练轮数", "grad_accum": "梯度累积步数",
             "max_text_tokens": "文本最大词元数（不含图片的 197 个词元）", "eval_every": "每隔多少步评估一次",
             "save_every": "每隔多少步保存检查点", "seed": "随机种子", "num_workers": "DataLoader 的进程数",
             "projector_type": "投影层类型：linear 或 mlp2x_gelu", "feature_layer": "取视觉塔第几层的特征（-1 为最后一层）",
             "device": "cpu / cuda", "caption_eval_n": "用多少张验证图片计算描述准确率", "warmup_ratio": "预热步数占比",
             "weight_decay": "权重衰减", "keep_last": "保留最近几个检查点", "log_every": "每隔多少步记录一次",
             "eval_limit": "验证样本数"}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("profile", "out_dir", "resume") or f.name not in helps:
            continue
        kind = {"int | None": int, "int": int, "float": float, "str": str, "str | None": str}.get(str(f.type), str)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None, help=helps[f.name])
    p.add_argument("--gradient-checkpointing", action="store_true", help="打开梯度检查点（省显存，慢一些）")
    p.add_argument("--no-tensorboard", action="store_true", help="不写 TensorBoard 日志")
    p.add_argument("--no-accelerate", action="store_true", help="GPU 上不编译（torch.compile）冻结的 LLM")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("profile", "gradient_checkpointing", "no_tensorboard", "resume",
                                                "no_accelerate")}
    cfg = TrainConfig.for_profile(args.profile, **overrides, resume=args.resume,
                                  gradient_checkpointing=args.gradient_checkpointing,
                                  tensorboard=not args.no_tensorboard,
                                  accelerate=False if args.no_accelerate else None)
    try:
        result = train(cfg)
    except (TrainingError, cfg_mod.MissingResourceError) as e:
        print(f"错误：{e}", file=sys.stderr)
        return 2
    if result.metrics and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.metrics.items()}, ensure_ascii=False))
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
