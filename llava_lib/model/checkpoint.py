"""Checkpoints: the projection (safetensors + a JSON description, written atomically, no pickle) and, in Stage 2,
the LLM beside it (``llm/`` through ``save_pretrained``, so ``Qwen3ForCausalLM.from_pretrained`` loads it; with
LoRA the adapters in ``llm_lora/`` while training and the merged LLM in the final folder)."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from safetensors.torch import load_file, save

from ..config import TrainConfig
from ..files import atomic_write_bytes, atomic_write_json

WEIGHTS = "projection.safetensors"
META = "projection.json"
RUN_INFO = "llava_run.json"  # an export's record of its run (training config and metrics)
LLM_DIR, LORA_DIR = "llm", "llm_lora"
FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint (projection, LLM or ModelScope CLIP) that does not fit the model; ``problems`` lists each
    difference, and the message names them."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


def projection_meta(model) -> dict:
    return {"format": FORMAT, "projector_type": model.projector_type, "vision_hidden": model.vision.hidden_size,
            "llm_hidden": model.llm.config.hidden_size, "feature_layer": model.vision.feature_layer,
            "num_image_tokens": model.num_image_tokens, "model_ids": getattr(model, "model_ids", {})}


def save_projection(directory: str | Path, model, extra: dict | None = None) -> Path:
    """Write ``projection.safetensors`` and ``projection.json`` into ``directory``; returns the directory."""
    directory = Path(directory)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS, save(state, metadata={"format": str(FORMAT)}))
    atomic_write_json(directory / META, {**projection_meta(model), **(extra or {})})
    return directory


# Fields that must agree for the weights to mean the same thing (model ids may differ: paths move).
_MUST_MATCH = ("projector_type", "vision_hidden", "llm_hidden", "feature_layer", "num_image_tokens")


def load_projection(directory: str | Path, model) -> dict:
    """Load weights into ``model.projector`` after checking that the checkpoint fits; returns its JSON."""
    directory = Path(directory)
    if not (directory / WEIGHTS).exists() or not (directory / META).exists():
        raise FileNotFoundError(f"在 {directory} 中找不到投影层检查点（需要 {WEIGHTS} 和 {META}）。"
                                f"请先运行训练（llava-train），或检查目录是否正确。")
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    expected = projection_meta(model)
    diffs = [f"{k}: 检查点={meta.get(k)!r}，当前模型={expected[k]!r}" for k in _MUST_MATCH if meta.get(k) != expected[k]]
    if diffs:
        raise CheckpointMismatchError(f"检查点 {directory} 与当前模型不匹配：\n  " + "\n  ".join(diffs))
    model.projector.load_state_dict(load_file(str(directory / WEIGHTS)))  # copied onto the projection's device
    return meta


def list_runs(checkpoints_dir: str | Path) -> list[dict]:
    """Runs (folders with ``final/projection.json``) under ``checkpoints_dir``, newest first: ``name``, ``dir``,
    ``projection`` (the folder to load), ``profile``, ``steps``, ``stage``, ``modified``, ``metrics``."""
    runs = []
    for meta_file in Path(checkpoints_dir).glob(f"*/final/{META}"):
        run_dir = meta_file.parent.parent
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        cfg = _read_json(run_dir / "config.json")
        weights = meta_file.parent / WEIGHTS
        runs.append({"name": run_dir.name, "dir": run_dir, "projection": meta_file.parent,
                     "profile": cfg.get("profile"), "steps": meta.get("step"), "stage": meta.get("stage", 1),
                     "modified": (weights if weights.exists() else meta_file).stat().st_mtime,
                     "metrics": _read_json(run_dir / "metrics.json")})
    return sorted(runs, key=lambda r: r["modified"], reverse=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def find_projection(path) -> Path | None:
    """The folder holding ``projection.json``: ``path`` itself or its ``final/`` (None: neither)."""
    path = Path(path).expanduser()
    return next((p for p in (path, path / "final") if (p / META).is_file()), None)


def run_files(ckpt: Path) -> tuple[dict, dict]:
    """(training config, metrics) of the run a checkpoint folder belongs to; ``{}`` where not written (yet)."""
    for run in (ckpt.parent, ckpt.parent.parent):
        cfg = _read_json(run / "config.json")
        if "profile" in cfg:
            return cfg, _read_json(run / "metrics.json")
    return {}, {}


def run_config(checkpoint, profile: str | None = None):
    """The ``TrainConfig`` of the run a checkpoint (or an export) comes from, as its ``config.json`` has it; the
    profile's defaults when there is none."""
    path = Path(checkpoint).expanduser()
    if (path / RUN_INFO).is_file():
        info = _read_json(path / RUN_INFO)
        saved, stage = info["train_config"], info["stage"]
    else:
        ckpt = find_projection(path) or path
        saved, stage = run_files(ckpt)[0], _read_json(ckpt / META).get("stage", 1)
    if saved:
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in saved.items() if k in names})
    return TrainConfig.for_profile(profile, stage=stage)


def save_llm(directory: str | Path, model, tokenizer=None, merge_lora: bool = False) -> None:
    """The Stage 2 LLM into ``directory``: ``llm/`` (full weights) or ``llm_lora/`` (adapters only). ``merge_lora``
    folds the adapters into the live model's weights first and writes ``llm/``; with ``tokenizer`` beside it,
    ``llm/`` is a complete Qwen3 directory."""
    directory = Path(directory)
    if model.peft is not None and not merge_lora:
        model.peft.save_pretrained(str(directory / LORA_DIR))
        return
    if model.peft is not None:
        model.llm = model.peft.merge_and_unload()
        model.peft = None
    model.llm.save_pretrained(str(directory / LLM_DIR))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / LLM_DIR))


def load_llm_weights(directory: str | Path, model) -> None:
    """Put the LLM weights that :func:`save_llm` wrote back into ``model`` (for an exact resume)."""
    directory = Path(directory)
    if (directory / LORA_DIR).is_dir():
        from peft import set_peft_model_state_dict
        if model.peft is None:
            raise CheckpointMismatchError(f"{directory} 保存的是 LoRA 适配器，但当前模型没有开启 LoRA（lora=True）。")
        set_peft_model_state_dict(model.peft, load_file(str(directory / LORA_DIR / "adapter_model.safetensors")))
        return
    files = sorted((directory / LLM_DIR).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"在 {directory} 中找不到 Stage 2 的 LLM 权重（{LLM_DIR}/*.safetensors 或 {LORA_DIR}/）。")
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    missing, unexpected = model.llm.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.llm.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointMismatchError(f"{directory / LLM_DIR} 与当前 LLM 对不上：缺少 {sorted(set(missing) - tied)[:5]}，"
                                      f"多余 {sorted(unexpected)[:5]}。")
