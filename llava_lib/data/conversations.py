"""Stage 2 data in CogVLM-SFT-311K's layout: ``<root>/<subset>/images/00000001.jpg`` + ``labels_zh/00000001.json``
holding ``{"conversations": [{"role": "user" | "assistant", "content": "..."}, ...]}``. The image goes into the first
user turn; every assistant turn carries loss. Bad input is skipped and named, never guessed around: bad label files
while the folder is read (:class:`SftStats`), an undecodable image as a :class:`SkippedSample`.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .. import process
from .dataset import SkippedSample, Transform

log = logging.getLogger(__name__)

SFT_SUBSETS = ("llava_instruction_single_conversation_formate", "llava_instruction_multi_conversations_formate")
LABELS_DIR = "labels_zh"
# Optional, beside the subsets, one conversation per line: text-only chats mixed into training keep the LLM's plain
# chat (as LLaVA-1.5 mixes in ShareGPT); Stage 2 reports the eval file's loss before and after.
TEXT_TRAIN_FILE = "text_only_train.jsonl"
TEXT_EVAL_FILE = "text_only_eval.jsonl"


@dataclass
class SftStats:
    """What reading the folder kept and dropped; ``bad`` lists ``(file, reason)`` for every dropped file."""

    kept: int = 0
    bad: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.bad:
            return f"读取 {self.kept} 段对话，没有坏样本。"
        counts = "，".join(f"{r} {n} 个" for r, n in Counter(r for _, r in self.bad).items())
        first = "\n".join(f"    {f}: {r}" for f, r in self.bad[:5])
        return f"读取 {self.kept} 段对话，跳过 {len(self.bad)} 个坏样本（{counts}），例如：\n{first}"


def parse_conversation(data) -> list[dict]:
    """The conversation of one label file, validated; raises ``ValueError`` with the reason in Chinese."""
    turns = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError("对话为空（没有 conversations）")
    for t in turns:
        if not isinstance(t, dict) or t.get("role") not in ("user", "assistant"):
            raise ValueError(f"未知的角色：{t.get('role') if isinstance(t, dict) else t!r}")
        if not isinstance(t.get("content"), str) or not t["content"].strip():
            raise ValueError("某一轮的内容为空")
        if process.IMAGE_MARKER in t["content"]:
            raise ValueError(f"内容里已经有 {process.IMAGE_MARKER} 标记（图片由读取器放进第一个用户轮次）")
    if turns[0]["role"] != "user":
        raise ValueError("对话不是从用户开始的")
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("对话里没有助手的回答")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def read_text_eval(path: Path) -> list[list[dict]]:
    """Text-only conversations (one JSON per line, same format); missing file -> []."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [parse_conversation(json.loads(line)) for line in lines if line]


class ConversationDataset(Dataset):
    """CogVLM-SFT-311K (or the mini world's corpus in its layout) as ``{"pixel_values", "messages", "row_id"}``.
    Samples ``0 .. n_with_image - 1`` have an image; the text-only ones of ``text_only_train.jsonl`` follow, with
    ``pixel_values`` None."""

    def __init__(self, root, transform: Transform | None = process.clip_transform, how_to_get: str = ""):
        self.root, self.transform = Path(root).expanduser(), transform
        found = [s for s in SFT_SUBSETS if (self.root / s / LABELS_DIR).is_dir()]
        if not found:
            raise FileNotFoundError(
                f"在 {self.root} 中找不到 Stage 2 对话数据（应有 {' 或 '.join(SFT_SUBSETS)} 子目录，各含 images/ 与 "
                f"{LABELS_DIR}/）。" + (f"\n  解决办法：运行 `{how_to_get}`。" if how_to_get else ""))
        self.stats, self.images, self.conversations = SftStats(), [], []
        for label in (p for s in found for p in sorted((self.root / s / LABELS_DIR).glob("*.json"))):
            image = label.parent.parent / "images" / f"{label.stem}.jpg"
            try:
                if not image.is_file():
                    raise ValueError(f"缺少图片 {image.name}")
                messages = parse_conversation(json.loads(label.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                self.stats.bad.append((str(label), "JSON 格式错误" if isinstance(e, json.JSONDecodeError) else str(e)))
                continue
            self.images.append(image)
            first = {**messages[0], "content": f"{process.IMAGE_MARKER}\n{messages[0]['content']}"}
            self.conversations.append([first] + messages[1:])
        self.n_with_image = len(self.images)
        self.conversations += read_text_eval(self.root / TEXT_TRAIN_FILE)
        self.stats.kept = len(self.conversations)
        if self.stats.bad:
            log.warning(self.stats.summary())
        # The sampler groups by length: the characters of all turns.
        self.lengths = np.asarray([sum(len(m["content"]) for m in c) for c in self.conversations], np.int64)

    def __len__(self) -> int:
        return len(self.conversations)

    def image(self, i: int) -> Image.Image:
        with Image.open(self.images[i]) as im:
            return im.convert("RGB")

    def __getitem__(self, i: int):
        i = int(i)
        sample = {"pixel_values": None, "messages": self.conversations[i], "row_id": i, "caption": None}
        if i < self.n_with_image:
            try:
                image = self.image(i)
            except (OSError, UnidentifiedImageError) as e:
                return SkippedSample(i, str(self.images[i]), "bad_image", f"图片无法解码：{self.images[i]}（{e}）")
            sample["pixel_values"] = self.transform(image) if self.transform else image
        return sample


def split_indices(n: int, eval_fraction: float) -> tuple[list[int], list[int]]:
    """A fixed held-out split (seed 0, whatever the training seed): ``(train, eval)`` indices."""
    order = np.random.default_rng(0).permutation(n).tolist()
    n_eval = min(n - 1, max(1, int(round(eval_fraction * n)))) if n > 1 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])
