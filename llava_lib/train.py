"""Training. Stage 1: only the projection learns. Stage 2 (``stage=2``): the projection and the LLM (or LoRA
adapters) learn from conversations, starting from a Stage 1 projection. The vision tower is always frozen.

``train(TrainConfig(...))`` is the notebook's call and ``llava-train`` the terminal's; under ``torchrun`` it runs
data-parallel (rank 0 evaluates, logs and saves). Its parts are public: ``setup`` -> ``train_step`` ->
``evaluate`` -> ``save_checkpoint`` / ``load_checkpoint``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from . import config as cfg_mod
from .config import TrainConfig
from .files import atomic_write_json
from .model.checkpoint import META, find_projection, load_llm_weights, load_projection, save_llm, save_projection
from .model.llava import lean_causal_lm_loss

__all__ = ["TrainConfig", "TrainingError", "TrainResult", "Run", "setup", "train_step", "evaluate", "train",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint", "lr_at", "read_scalars", "main"]


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, out of memory, bad data); the message says what to change."""


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict]
    metrics: dict = field(default_factory=dict)
    interrupted: bool = False


# ------------------------------------------------------------------------------------------ the schedule
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine down to ``min_lr_ratio * lr``."""
    warm = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_scheduler(optimizer, total: int, cfg: TrainConfig):
    """``lr_at`` as a ``LambdaLR``, so its position is saved and restored by its own ``state_dict``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total, cfg) / cfg.lr)


# ------------------------------------------------------------------------------------------- plug-ins
def load_hook(spec: str):
    """``"package.module:name"`` -> the object; how a profile plugs in its own loss or metric by name."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise cfg_mod.ConfigError(f"找不到插件 {spec!r}（格式：'包.模块:名字'）：{e}") from e


def pick_head_loss(spec: str, llm, device: torch.device):
    """The loss over the LM head. ``auto``: ``fused`` on CUDA (the head's gradient computed chunk by chunk in the
    forward, so no ``[chunk, vocab]`` logits wait for the backward), ``lean`` elsewhere; both equal transformers'
    causal-LM loss. Anything else names a factory ``f(lm_head) -> loss`` (the mini world's zero-rows loss)."""
    if spec == "auto":
        spec = "fused" if device.type == "cuda" else "lean"
    if spec == "lean":
        return lean_causal_lm_loss
    if spec == "fused":
        from .model.accel import fused_lean_causal_lm_loss
        return fused_lean_causal_lm_loss
    return load_hook(spec)(llm.lm_head)


# ------------------------------------------------------------------------------------------ one step
def _all_reduce_sum(x: float, device) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def loss_sum(model, batch, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's label tokens, and their number."""
    with autocast():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], pixel_values=batch["pixel_values"])
    return out.loss * out.n_label_tokens, out.n_label_tokens


def _sum_gradients(params: list) -> None:
    """Sum every gradient over the ranks (what DDP does, written out). DDP's wrapper needs the forward to go
    through it; ours calls the LLM's body and its head separately, so the gradients are reduced here, after the
    backward of the step's last batch: one all-reduce per tensor, all in flight at once."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for work in [torch.distributed.all_reduce(p.grad, async_op=True) for p in params]:
        work.wait()


def train_step(model, batches: list[dict], optimizer, scheduler=None, *, autocast=contextlib.nullcontext,
               max_grad_norm: float | None = None) -> dict:
    """One optimizer step over ``batches`` (gradient accumulation); returns ``{"loss", "lr", "n_tokens"}`` (and
    ``"grad_norm"`` when ``max_grad_norm`` clips). Every label token (labels shifted by one, -100 skipped) weighs the
    same: each batch's summed loss is divided by the token count of all batches on all ranks and the gradients are
    summed over ranks, which gives the gradient of the global mean. A non-finite loss raises before the update."""
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches if b["labels"].numel())
    n_total = _all_reduce_sum(n_local, model.device)
    total = 0.0
    for batch in batches:
        s, _ = loss_sum(model, batch, autocast)
        (s / max(n_total, 1.0)).backward()
        total += float(s.detach())
    loss = _all_reduce_sum(total, model.device) / max(n_total, 1.0)
    lr = optimizer.param_groups[0]["lr"]
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"损失是 {loss}（NaN/inf），训练已停止（学习率 {lr:.2e}）。")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    _sum_gradients(params)
    rec = {"loss": loss, "lr": lr, "n_tokens": int(n_total)}
    if max_grad_norm:
        rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return rec


# ---------------------------------------------------------------------------------------------- eval
def evaluate(model, loader, autocast=contextlib.nullcontext) -> float:
    """Mean cross-entropy per label token over ``loader`` (the held-out loss)."""
    total, n, was_training = 0.0, 0, model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                if batch["input_ids"].numel():
                    s, k = loss_sum(model, batch, autocast)
                    total, n = total + float(s), n + k
    finally:
        model.train(was_training)
    return total / max(n, 1)


def generate_captions(model, tokenizer, dataset, indices, max_new_tokens: int = 48,
                      batch_size: int = 32) -> list[tuple[str, str]]:
    """(generated, reference) for the given eval samples, greedy, in batches (the chat path's replies)."""
    from .chat import generate_batch
    from .process import caption_conversation
    images, prompts = [dataset.image(i) for i in indices], [caption_conversation(None)] * len(indices)
    return list(zip(generate_batch(model, tokenizer, images, prompts, max_new_tokens, batch_size),
                    [dataset.captions[i] for i in indices]))


def caption_accuracy(pairs, metric) -> float | None:
    """Share of ``(generated, reference)`` pairs that ``metric`` accepts; None without pairs."""
    return sum(bool(metric(g, r)) for g, r in pairs) / len(pairs) if pairs else None


def generate_answers(model, tokenizer, dataset, indices, max_new_tokens: int = 32,
                     batch_size: int = 32) -> list[tuple[str, str]]:
    """(generated, reference) for every assistant turn of the given conversations, greedy, in batches; the
    reference turns before each answer are its history (as ``chat.answer_turns``)."""
    from .chat import answer_prompts, generate_batch
    items = [(dataset.image(i), m, r) for i in indices for m, r in answer_prompts(dataset.conversations[i])]
    images, convs, refs = map(list, zip(*items)) if items else ([], [], [])
    return list(zip(generate_batch(model, tokenizer, images, convs, max_new_tokens, batch_size), refs))


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, state: dict, keep_last: int = 3) -> Path:
    """Projection + everything a resume needs, in ``ckpt_dir/step-NNNNNN``: optimizer and scheduler through their
    own ``state_dict()`` (any optimizer works) and the random states, readable by ``torch.load(weights_only=True)``;
    data position and history in JSON. Written into a temp folder, renamed, then pointed at by ``latest.json``: a
    run killed at any moment leaves the previous checkpoint intact."""
    ckpt_dir = Path(ckpt_dir)
    name = f"step-{state['step']:06d}"
    final, tmp = ckpt_dir / name, ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_projection(tmp, model, {**getattr(model, "stage_meta", {}), "step": state["step"]})
    if model.llm_trainable:
        save_llm(tmp, model)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
               tmp / "train_state.pt")
    atomic_write_json(tmp / "train_state.json", state)
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


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state (step, data position, history)."""
    path = Path(path)
    load_projection(path, model)
    if model.llm_trainable:
        load_llm_weights(path, model)
    saved = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    # The saved lr is the next step's on the saved run's schedule; a resume with other max_steps / epochs follows
    # its own schedule from the first step on (with the same settings this is the same value).
    for group, base, fn in zip(optimizer.param_groups, getattr(scheduler, "base_lrs", []),
                               getattr(scheduler, "lr_lambdas", [])):
        group["lr"] = base * fn(scheduler.last_epoch)
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return json.loads((path / "train_state.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- setup
def stage1_data(paths: cfg_mod.Paths, cfg: TrainConfig):
    """Stage 1: (train set, its indices, eval set, its indices, text-only eval samples), as ``stage2_data``."""
    from .data import CachedImageDataset
    train_dir, eval_dir = Path(paths.cache_dir) / "train", Path(paths.cache_dir) / "eval"
    if not train_dir.exists():
        raise cfg_mod.MissingResourceError(
            f"找不到训练图片缓存：{train_dir}\n  解决办法：运行 `{cfg_mod.how_to_get(paths, 'cache_dir')}`。")
    train = CachedImageDataset(train_dir)
    if eval_dir.exists():
        ev, n_train = CachedImageDataset(eval_dir), len(train)
        eval_idx = list(range(min(cfg.eval_limit, len(ev))))
    else:  # hold out the tail of the train cache
        ev, n_train = train, max(0, len(train) - cfg.eval_limit)
        eval_idx = list(range(n_train, len(train)))
    if cfg.limit is not None:
        n_train = min(n_train, cfg.limit)
    if n_train <= 0:
        raise TrainingError("训练集为空：请检查 limit / eval_limit 和图片缓存。")
    return train, list(range(n_train)), ev, eval_idx, []  # no text-only eval set in Stage 1


def stage2_data(paths: cfg_mod.Paths, cfg: TrainConfig):
    """Stage 2: the conversations, a fixed held-out share of them, and the text-only eval set (if any)."""
    from .data.conversations import TEXT_EVAL_FILE, ConversationDataset, read_text_eval, split_indices
    ds = ConversationDataset(paths.sft_root, how_to_get=cfg_mod.how_to_get(paths, "sft_root"))
    print(f"[train] {ds.stats.summary()}")
    train_idx, eval_idx = split_indices(ds.n_with_image, cfg.eval_fraction)
    train_idx += list(range(ds.n_with_image, len(ds)))  # text-only conversations: training only
    if cfg.limit is not None:
        train_idx = train_idx[:cfg.limit]
    if not train_idx:
        raise TrainingError(f"Stage 2 训练集为空：{paths.sft_root} 中没有可用的对话。")
    text = [{"pixel_values": None, "messages": m, "row_id": i, "caption": None}
            for i, m in enumerate(read_text_eval(Path(paths.sft_root) / TEXT_EVAL_FILE))]
    return ds, train_idx, ds, eval_idx[:cfg.eval_limit], text


def stage1_projection(cfg: TrainConfig) -> tuple[Path, dict]:
    """Where Stage 2 starts, and its ``projection.json``: ``cfg.stage1`` (a run folder or its ``final/``), else the
    profile's default Stage 1 run; on the mini profile that run is trained first when it does not exist yet."""
    given = Path(cfg.stage1).expanduser() if cfg.stage1 else Path(cfg.paths.checkpoints_dir) / f"stage1-{cfg.profile}"
    found = find_projection(given)
    if found is not None:
        meta = json.loads((found / META).read_text(encoding="utf-8"))
        if meta.get("stage", 1) != 1:
            raise cfg_mod.ConfigError(f"{found} 是 Stage 2 的检查点；--stage1 要指向 Stage 1 的运行。")
        return found, meta
    if cfg.stage1 or cfg.profile != "mini" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise cfg_mod.MissingResourceError(
            f"找不到 Stage 1 的投影层：{given}（应有 {META}，或其中的 final/{META}）。\n  解决办法：先训练 Stage 1"
            f"（`llava-train --profile {cfg.profile} --out {given}`），或用 --stage1 DIR 指向一次 Stage 1 运行。")
    print(f"[train] 还没有 Stage 1 的迷你运行：先训练它（{given}），再开始 Stage 2。")
    train(TrainConfig.for_profile("mini", out_dir=str(given), progress=cfg.progress, tensorboard=cfg.tensorboard,
                                  device=cfg.device))
    return stage1_projection(dataclasses.replace(cfg, stage1=str(given / "final")))


def _check_passed_model(model, cfg: TrainConfig) -> None:
    """A model handed to ``train`` must be the one the config describes, or the saved config would lie."""
    have = {"projector_type": model.projector_type, "feature_layer": model.vision.feature_layer}
    diffs = [f"{k}: 传入的模型={v!r}，配置={getattr(cfg, k)!r}" for k, v in have.items() if getattr(cfg, k) != v]
    if diffs:
        raise TrainingError("传入的模型与训练配置不一致：\n  " + "\n  ".join(diffs)
                            + "\n  解决办法：不传 model（train 会按配置新建一个），或把配置改成与模型一致。")


@dataclass
class Run:
    """Everything ``setup`` prepared for one run."""

    cfg: TrainConfig
    device: torch.device
    model: object
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: object
    train_view: object
    collate: object
    eval_loader: object
    eval_ds: object
    eval_idx: list
    total_steps: int
    out_dir: Path
    rank: int = 0
    world_size: int = 1
    metric: object = None  # the profile's check of a generated caption (Stage 1) or answer (Stage 2)
    text_loader: object = None

    def generate(self, indices: list) -> list[tuple[str, str]]:
        """(generated, reference) for eval samples: their captions in Stage 1, every answer in Stage 2."""
        generate = generate_captions if self.cfg.stage == 1 else generate_answers
        return generate(self.model, self.tokenizer, self.eval_ds, indices)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def batches(self, state: dict):
        """Endless lists of ``grad_accum`` non-empty batches from the data position in ``state`` (kept up to date)."""
        while True:
            self.sampler.set_epoch(state["epoch"], state["batch_in_epoch"])
            micro = []
            for b in DataLoader(self.train_view, batch_sampler=self.sampler, collate_fn=self.collate,
                                num_workers=self.cfg.num_workers):
                state["batch_in_epoch"] += 1
                if b["skipped"] and self.is_main:
                    print(f"[train] 跳过 {len(b['skipped'])} 个无法读取的样本：{b['skipped'][0].message}")
                if b["input_ids"].numel():
                    micro.append(b)
                if len(micro) == self.cfg.grad_accum:
                    yield micro
                    micro = []
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0


def setup(cfg: TrainConfig, model=None, tokenizer=None) -> Run:
    """Process group, device, model (built from ``cfg`` unless given), data, AdamW and the schedule."""
    from .data import LengthGroupedSampler, make_collate
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_cuda = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg.device or local_cuda)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    paths = cfg.paths
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(paths.checkpoints_dir) / f"stage{cfg.stage}-{cfg.profile}"
    if cfg.stage not in (1, 2):
        raise cfg_mod.ConfigError(f"stage 只能是 1 或 2，而不是 {cfg.stage}。")
    parent, meta = stage1_projection(cfg) if cfg.stage == 2 else (None, None)
    if parent is not None:  # Stage 2 continues the Stage 1 projection: same type, same vision layer
        cfg = dataclasses.replace(cfg, projector_type=meta["projector_type"], feature_layer=meta["feature_layer"])
    torch.manual_seed(cfg.seed)
    if model is None:
        from .model.loading import build_model
        model, tokenizer = build_model(paths, device=device, projector_type=cfg.projector_type,
                                       feature_layer=cfg.feature_layer,
                                       llm_dtype=torch.float32 if parent is not None else None)
    else:
        _check_passed_model(model, cfg)
    if parent is not None:
        load_projection(parent, model)
        model.unfreeze_llm({"r": cfg.lora_r, "alpha": cfg.lora_alpha} if cfg.lora else None, cfg.train_embeddings)
        model.stage_meta = {"stage": 2, "stage1": str(parent), "lora": cfg.lora}
    model.head_loss = pick_head_loss(cfg.head_loss, model.llm, device)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.accelerate or (cfg.accelerate is None and device.type == "cuda"):
        from .model.accel import compile_towers
        compile_towers(model)  # measured in benchmarks/train_step.py and docs/perf_notes.md
    if world > 1:  # every rank starts from rank 0's trainable weights (LoRA adapters are initialised at random)
        for p in (p for p in model.parameters() if p.requires_grad):
            torch.distributed.broadcast(p.data, 0)

    train_ds, train_idx, eval_ds, eval_idx, text = (stage2_data if cfg.stage == 2 else stage1_data)(paths, cfg)
    collate = make_collate(tokenizer, model.num_image_tokens, cfg.max_text_tokens)
    pool = load_hook(cfg.instructions) if cfg.instructions and cfg.stage == 1 else None
    train_collate = make_collate(tokenizer, model.num_image_tokens, cfg.max_text_tokens, prompts=pool)
    sampler = LengthGroupedSampler([int(train_ds.lengths[i]) for i in train_idx], cfg.batch_size, seed=cfg.seed,
                                   group_by_length=cfg.group_by_length, rank=rank, world_size=world,
                                   drop_last=world > 1)
    steps_per_epoch = len(sampler.batches()) // cfg.grad_accum
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if steps_per_epoch else cfg.max_steps
    if total <= 0:
        raise TrainingError(f"没有可训练的步数：每轮 {steps_per_epoch} 步。请减小 batch_size 或 grad_accum。")
    eval_loader = DataLoader(Subset(eval_ds, eval_idx), batch_size=cfg.batch_size, collate_fn=collate,
                             num_workers=cfg.num_workers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    text_loader = DataLoader(text, batch_size=cfg.batch_size, collate_fn=collate) if text else None
    metric = cfg.caption_metric if cfg.stage == 1 else cfg.answer_metric
    return Run(cfg, device, model, tokenizer, optimizer, make_scheduler(optimizer, total, cfg), sampler,
               Subset(train_ds, train_idx), train_collate, eval_loader, eval_ds, eval_idx, total, out_dir, rank,
               world, load_hook(metric) if metric else None, text_loader)


# ------------------------------------------------------------------------------------------- logging
class _Logger:
    """Progress bar and TensorBoard of rank 0 (silent on the other ranks)."""

    def __init__(self, run: Run, initial: int):
        from tqdm.auto import tqdm
        self.writer = None
        if run.is_main and run.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run.out_dir / "tensorboard"))
        self.bar = tqdm(total=run.total_steps, initial=initial, desc=f"Stage {run.cfg.stage} 训练",
                        dynamic_ncols=True, disable=not (run.is_main and run.cfg.progress))

    def step(self, rec: dict) -> None:
        self.bar.update(rec["step"] - self.bar.n)  # called every log_every steps: move to the step itself
        if self.writer:
            for tag in ("train/loss", "train/ppl", "train/lr", "perf/samples_per_s", "perf/data_wait_frac"):
                self.writer.add_scalar(tag, rec[tag.split("/")[1]], rec["step"])
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", ppl=f"{rec['ppl']:.1f}", lr=f"{rec['lr']:.2e}",
                             sps=f"{rec['samples_per_s']:.1f}")


def run_eval(run: Run, step: int, log: _Logger, tag: str = "") -> dict:
    """Held-out loss on every rank; rank 0 prints and logs it, with generated captions (answers) next to their
    references."""
    loss = evaluate(run.model, run.eval_loader, run.autocast)
    rec = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
    show = run.eval_idx[:run.cfg.caption_show_n]
    if run.is_main and show:
        rec["captions"] = run.generate(show)
    if log.writer:
        for k in ("loss", "ppl"):
            log.writer.add_scalar(f"eval/{k}", rec[f"eval_{k}"], step)
        if rec.get("captions"):
            table = "| 生成 | 参考 |\n|---|---|\n" + "\n".join(f"| {g} | {r} |" for g, r in rec["captions"])
            log.writer.add_text("eval/captions", table, step)
    if run.is_main:
        print(f"[train] {tag}第 {step} 步评估：loss {loss:.4f}  ppl {rec['eval_ppl']:.2f}")
    return rec


def measure_quality(run: Run, metrics: dict, when: str) -> None:
    """``caption_accuracy_<when>`` (Stage 1, first ``caption_eval_n`` eval images) or ``answer_accuracy_<when>``
    (Stage 2, every answer of the first ``answer_eval_n`` eval conversations) when the profile has a metric, and
    in Stage 2 ``text_only_loss_<when>`` when there is a text-only eval set."""
    said = "训练前" if when == "before" else "训练后"
    if run.text_loader is not None:
        loss = evaluate(run.model, run.text_loader, run.autocast)
        if run.is_main:
            metrics[f"text_only_loss_{when}"] = loss
            print(f"[train] {said}纯文本对话的损失：{loss:.4f}")
    n, name, label = ((run.cfg.caption_eval_n, "caption_accuracy", "描述准确率") if run.cfg.stage == 1 else
                      (run.cfg.answer_eval_n, "answer_accuracy", "回答准确率"))
    pairs = run.generate(run.eval_idx[:n]) if run.is_main and run.metric else []
    if pairs:
        metrics[f"{name}_{when}"] = caption_accuracy(pairs, run.metric)
        print(f"[train] {said}{label}：{metrics[f'{name}_{when}']:.2%}")


def _finish(run: Run, state: dict, log: _Logger, seconds: float, samples: int, data_wait: float) -> None:
    final = run_eval(run, state["step"], log, "训练后 ")
    state["eval_history"].append(final)
    if not run.is_main:
        return
    metrics = state["metrics"]
    metrics["eval_loss_after"] = final["eval_loss"]
    measure_quality(run, metrics, "after")
    metrics.update(steps=state["step"], train_samples_per_s=samples / max(seconds, 1e-9),
                   data_wait_fraction=data_wait / max(seconds, 1e-9), wall_seconds=seconds,
                   world_size=run.world_size, device=str(run.device),
                   attention=run.model.llm.config._attn_implementation,
                   eval_ppl_before=math.exp(min(metrics.get("eval_loss_before", 50), 50)),
                   eval_ppl_after=final["eval_ppl"])
    save_checkpoint(run.ckpt_dir, run.model, run.optimizer, run.scheduler, state, run.cfg.keep_last)
    save_projection(run.out_dir / "final", run.model, {**getattr(run.model, "stage_meta", {}), "step": state["step"]})
    if run.model.llm_trainable:  # the whole LLM (LoRA merged in), loadable with Qwen3ForCausalLM.from_pretrained
        save_llm(run.out_dir / "final", run.model, run.tokenizer, merge_lora=True)
    atomic_write_json(run.out_dir / "metrics.json", metrics)
    atomic_write_json(run.out_dir / "config.json", dataclasses.asdict(run.cfg))


# ---------------------------------------------------------------------------------------------- train
def train(config: TrainConfig | None = None, on_log=None, model=None, tokenizer=None) -> TrainResult:
    """Run Stage 1 or 2 (``config.stage``). ``on_log(history)`` is called after every logged step (the
    notebook's live plot). Ctrl-C (KeyboardInterrupt) saves a checkpoint and returns what was trained so far."""
    cfg = config or TrainConfig.for_profile()
    run = setup(cfg, model, tokenizer)
    if run.is_main:
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "eval_history": [], "metrics": {}}
    last = latest_checkpoint(run.out_dir) if cfg.resume else None
    if last is not None:
        state = load_checkpoint(last, run.model, run.optimizer, run.scheduler)
    if run.is_main and cfg.resume:
        print(f"[train] 从检查点 {last} 继续（第 {state['step']} 步）。" if last else
              f"[train] {run.ckpt_dir} 中没有检查点，从头开始训练。")
    log = _Logger(run, state["step"])
    if state["step"] == 0:
        state["metrics"]["eval_loss_before"] = run_eval(run, 0, log, "训练前 ")["eval_loss"]
        measure_quality(run, state["metrics"], "before")
    run.model.train()
    batches = run.batches(state)
    t_start, samples, data_wait, interrupted = time.time(), 0, 0.0, False
    try:
        while state["step"] < run.total_steps:
            t0 = time.time()
            micro = next(batches)
            data_wait += time.time() - t0
            try:
                rec = train_step(run.model, micro, run.optimizer, run.scheduler, autocast=run.autocast,
                                 max_grad_norm=cfg.max_grad_norm)
            except TrainingError as e:
                raise TrainingError(f"第 {state['step']} 步：{e} 最后一个完好的检查点："
                                    f"{latest_checkpoint(run.out_dir) or '（尚无）'}。可以降低学习率（lr，当前 "
                                    f"{cfg.lr}）后用 resume=True 继续。") from None
            state["step"] += 1
            samples += sum(b["input_ids"].shape[0] for b in micro) * run.world_size
            elapsed = time.time() - t_start
            rec.update(step=state["step"], ppl=math.exp(min(rec["loss"], 50)), samples_per_s=samples / elapsed,
                       data_wait_frac=data_wait / elapsed)
            state["history"].append(rec)
            done = state["step"] == run.total_steps
            if run.is_main and (state["step"] % cfg.log_every == 0 or done):
                log.step(rec)
                if on_log:
                    on_log(state["history"])
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and not done:
                state["eval_history"].append(run_eval(run, state["step"], log))
            if run.is_main and cfg.save_every and state["step"] % cfg.save_every == 0 and not done:
                save_checkpoint(run.ckpt_dir, run.model, run.optimizer, run.scheduler, state, cfg.keep_last)
    except KeyboardInterrupt:
        interrupted = True
        if run.is_main:
            p = save_checkpoint(run.ckpt_dir, run.model, run.optimizer, run.scheduler, state, cfg.keep_last)
            print(f"\n[train] 已中断：检查点保存在 {p}；用 resume=True 可以从这里继续。")
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"显存不足（CUDA out of memory）。可以调小 batch_size（当前 {cfg.batch_size}，可配合 grad_accum 保持等效"
            f"批量）、调小 max_text_tokens（当前 {cfg.max_text_tokens}），或打开 gradient_checkpointing=True。") from e
    finally:
        log.bar.close()
    if not interrupted:
        _finish(run, state, log, time.time() - t_start, samples, data_wait)
    if log.writer:
        log.writer.close()
    if run.world_size > 1:
        torch.distributed.barrier()
    return TrainResult(run.out_dir, state["history"], state["metrics"], interrupted)


# ---------------------------------------------------------------------------------------------- logs
def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars back as ``{tag: [(step, value), ...]}`` (for a matplotlib plot)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="llava-train", description="LLaVA 训练。Stage 1（默认）：只训练投影层，视觉塔与 LLM "
                                "冻结；Stage 2（--stage 2）：从 Stage 1 的投影层出发，用多轮图文对话训练投影层和 LLM（或 --lora）。"
                                "每个选项都对应 TrainConfig 的一个字段；不写的选项取配置档（--profile）的默认值。")
    p.add_argument("--out", dest="out_dir", default=None, help="输出目录（同 --out-dir）")
    cfg_mod.add_config_flags(p)
    try:
        result = train(cfg_mod.config_from_args(p.parse_args(argv)))
    except (TrainingError, cfg_mod.MissingResourceError, cfg_mod.ConfigError) as e:
        print(f"错误：{e}", file=sys.stderr)
        return 2
    if result.metrics and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.metrics, ensure_ascii=False))
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
