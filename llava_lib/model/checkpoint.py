"""Projection checkpoints: safetensors weights + a JSON description, written atomically (no pickle)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "projection.safetensors"
META = "projection.json"
FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A projection checkpoint that does not fit the model; the message lists what differs."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8"))


def _projector(model):
    """The projection module itself, also when DDP wraps it (its state-dict keys must not say ``module.``)."""
    return getattr(model.projector, "module", model.projector)


def projection_meta(model) -> dict:
    return {
        "format": FORMAT,
        "projector_type": model.projector_type,
        "vision_hidden": model.vision.hidden_size,
        "llm_hidden": model.llm.config.hidden_size,
        "feature_layer": model.vision.feature_layer,
        "num_image_tokens": model.num_image_tokens,
        "model_ids": getattr(model, "model_ids", {}),
    }


def save_projection(directory: str | Path, model, extra: dict | None = None) -> Path:
    """Write ``projection.safetensors`` and ``projection.json`` into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in _projector(model).state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": str(FORMAT)})
        os.replace(tmp, directory / WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(directory / META, {**projection_meta(model), **(extra or {})})
    return directory


# Fields that must agree for the weights to mean the same thing; model ids only warn (paths move).
_MUST_MATCH = ("projector_type", "vision_hidden", "llm_hidden", "feature_layer", "num_image_tokens")


def load_projection(directory: str | Path, model, strict_ids: bool = False) -> dict:
    """Load weights into ``model.projector`` after checking that the checkpoint fits; returns its JSON."""
    directory = Path(directory)
    if not (directory / WEIGHTS).exists() or not (directory / META).exists():
        raise FileNotFoundError(
            f"在 {directory} 中找不到投影层检查点（需要 {WEIGHTS} 和 {META}）。"
            f"请先运行训练（llava-train），或检查目录是否正确。")
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    expected = projection_meta(model)
    diffs = [f"{k}: 检查点={meta.get(k)!r}，当前模型={expected[k]!r}" for k in _MUST_MATCH if meta.get(k) != expected[k]]
    if strict_ids and meta.get("model_ids") != expected["model_ids"]:
        diffs.append(f"model_ids: 检查点={meta.get('model_ids')!r}，当前模型={expected['model_ids']!r}")
    if diffs:
        raise CheckpointMismatchError(f"检查点 {directory} 与当前模型不匹配：\n  " + "\n  ".join(diffs))
    state = load_file(str(directory / WEIGHTS))
    projector = _projector(model)
    device = next(projector.parameters()).device
    projector.load_state_dict({k: v.to(device) for k, v in state.items()})
    return meta


def list_runs(checkpoints_dir: str | Path) -> list[dict]:
    """Trained runs under ``checkpoints_dir`` (``llava-train`` and notebook runs alike), newest first.

    A run is a folder with ``final/projection.json``. Each entry: ``name``, ``dir``, ``projection`` (the folder to
    load), ``profile``, ``steps``, ``modified`` (seconds since the epoch), ``metrics`` (``metrics.json`` or ``{}``).
    """
    runs = []
    for meta_file in Path(checkpoints_dir).glob(f"*/final/{META}"):
        run_dir = meta_file.parent.parent
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        cfg = _read_json(run_dir / "config.json")
        runs.append({"name": run_dir.name, "dir": run_dir, "projection": meta_file.parent,
                     "profile": cfg.get("profile"), "steps": meta.get("step"),
                     "modified": (meta_file.parent / WEIGHTS).stat().st_mtime if (meta_file.parent / WEIGHTS).exists()
                     else meta_file.stat().st_mtime,
                     "metrics": _read_json(run_dir / "metrics.json")})
    return sorted(runs, key=lambda r: r["modified"], reverse=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
