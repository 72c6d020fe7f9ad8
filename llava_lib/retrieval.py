"""Chinese-CLIP matching over a folder of images: text -> images and image -> captions (``02_clip_matching``).

Both sides are embedded with the whole ``ChineseCLIPModel`` (the towers plus their projections), L2-normalised,
and compared by cosine similarity, which after normalisation is a plain dot product.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .process import clip_transform


@dataclass(frozen=True)
class ExampleFolder:
    """Images of a folder (sorted by name) and the caption of each (``NNNN.txt`` beside ``NNNN.jpg``; "" if none)."""

    paths: list[Path]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]

    def image(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def images(self) -> list[Image.Image]:
        return [self.image(i) for i in range(len(self))]


def read_examples(folder) -> ExampleFolder:
    """The example images of ``folder`` with their captions; a clear error if there are none."""
    folder = Path(folder).expanduser()
    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise FileNotFoundError(
            f"在 {folder} 中没有找到示例图片（*.jpg / *.png）。迷你世界的示例图片可以用 "
            f"`python -m llava_lib.mini examples` 生成。")
    txts = [p.with_suffix(".txt") for p in paths]
    return ExampleFolder(paths, [t.read_text(encoding="utf-8").strip() if t.is_file() else "" for t in txts])


@dataclass(frozen=True)
class Match:
    index: int
    score: float


def cosine_similarities(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``[Q, D] x [N, D] -> [Q, N]`` cosine similarities (inputs need not be normalised)."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T


def top_k(scores: torch.Tensor | Sequence[float], k: int = 5) -> list[Match]:
    """The ``k`` best entries of a 1-D score vector, best first (ties: the lower index first)."""
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
    k = min(k, scores.numel())
    # A stable descending sort keeps equal scores in index order, on every machine.
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return [Match(int(i), float(scores[i])) for i in order]


class ClipMatcher:
    """A frozen ``ChineseCLIPModel`` with its processor's BERT tokenizer, for matching."""

    def __init__(self, model, processor, max_text_tokens: int = 64):
        self.model = model.eval()
        self.processor = processor
        max_pos = getattr(model.config.text_config, "max_position_embeddings", max_text_tokens)
        self.max_text_tokens = min(max_text_tokens, max_pos)

    @classmethod
    def from_pretrained(cls, path, device=None, max_text_tokens: int = 64) -> "ClipMatcher":
        """Load the model (``llava_lib.model.loading.load_clip``) and its processor from the same folder."""
        from transformers import AutoProcessor

        from .model.loading import load_clip
        model = load_clip(path, device=torch.device(device) if device is not None else None)
        return cls(model, AutoProcessor.from_pretrained(str(path)), max_text_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """``[N, D]`` unit-length image embeddings (float32, on the CPU)."""
        out = []
        for i in range(0, len(images), batch_size):
            # The project's one image geometry (``process.clip_transform``), not the saved processor's own.
            pixels = torch.stack([clip_transform(im) for im in images[i:i + batch_size]])
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``[N, D]`` unit-length text embeddings (float32, on the CPU); texts are cut at ``max_text_tokens``."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.processor(text=list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_text_tokens, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            feats = self.model.get_text_features(**enc).pooler_output
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    def text_scores(self, texts: Sequence[str], image_embeddings: torch.Tensor) -> torch.Tensor:
        """``[len(texts), N]`` cosine similarities of each text with each image."""
        return cosine_similarities(self.encode_texts(texts), image_embeddings)


def retrieval_accuracy(scores: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose own index (the diagonal: query i belongs to item i) is among the top ``k``."""
    ranks = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :k]
    own = torch.arange(scores.shape[0]).unsqueeze(1)
    return float((ranks == own).any(dim=1).float().mean()) if scores.numel() else 0.0
