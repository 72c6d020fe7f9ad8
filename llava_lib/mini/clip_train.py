"""The mini Chinese-CLIP: the real ``ChineseCLIPModel`` class at a small width, trained contrastively.

Same geometry as ViT-B/16 (224 px, patch 16 -> 197 tokens), so every shape downstream is the real one except
the width. A real CLIP learns from 400M pairs; ours has a few minutes of two CPU cores, so besides the CLIP loss
two throw-away linear probes speed it up: one on the patch tokens learns each patch's object (colour, shape),
which makes the patch features carry what a real CLIP's carry about a photo (what Stage 1 must read); one on
each side's pooled feature learns the scene's layout (which object sits in which of the 3x3 cells), which gives
the contrastive loss the structure it would otherwise take long to find. The probes are not saved.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChineseCLIPConfig, ChineseCLIPModel

from ..process import CLIP_MEAN, CLIP_STD
from .scenes import COLORS, SHAPES, Scene, patch_owner

COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}


def mini_clip_config(text_vocab_size: int, width: int = 96, layers: int = 4) -> ChineseCLIPConfig:
    return ChineseCLIPConfig(
        text_config=dict(vocab_size=text_vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=96, pad_token_id=0),
        vision_config=dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=4 * width, image_size=224, patch_size=16, projection_dim=64),
        projection_dim=64,
    )


N_CLASSES = 1 + len(COLORS) * len(SHAPES)  # background, or one (colour, shape) pair


def cell_targets(scene: Scene) -> np.ndarray:
    """Per grid cell (9): 0 if empty, else 1 + colour * n_shapes + shape."""
    out = np.zeros(9, dtype=np.int64)
    for o in scene.objects:
        out[o.cell] = 1 + COLOR_INDEX[o.color] * len(SHAPES) + SHAPE_INDEX[o.shape]
    return out


def patch_targets(scene: Scene) -> np.ndarray:
    """Per patch: 0 for background, else 1 + colour * n_shapes + shape of the object covering it."""
    owner = patch_owner(scene)
    out = np.zeros_like(owner)
    for i, o in enumerate(scene.objects):
        out[owner == i] = 1 + COLOR_INDEX[o.color] * len(SHAPES) + SHAPE_INDEX[o.shape]
    return out


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` uint8 -> CLIP-normalised float (same numbers as ``process.clip_transform`` on 224 px input)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _text_batch(tokenizer, captions, max_len=64):
    enc = tokenizer(list(captions), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def train_clip(images: torch.Tensor, scenes: list[Scene], tokenizer, *, steps: int = 150, batch: int = 64,
               lr: float = 2e-3, seed: int = 0, log=print) -> ChineseCLIPModel:
    """A fixed number of steps (deterministic for a seed; the time it takes depends on the machine)."""
    torch.manual_seed(seed)
    model = ChineseCLIPModel(mini_clip_config(len(tokenizer)))
    width, text_width = model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    probe = nn.Linear(width, N_CLASSES)
    image_layout = nn.Linear(width, 9 * N_CLASSES)
    text_layout = nn.Linear(text_width, 9 * N_CLASSES)
    targets = torch.from_numpy(np.stack([patch_targets(s) for s in scenes]))  # [N,196]
    layouts = torch.from_numpy(np.stack([cell_targets(s) for s in scenes]))   # [N,9]
    captions = [s.caption for s in scenes]
    params = [p for m in (model, probe, image_layout, text_layout) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    start = time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 15) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.95 + 0.05)
        idx = torch.randperm(n, generator=g)[:batch]
        pix = normalize_uint8(images[idx])
        ids, mask = _text_batch(tokenizer, [captions[i] for i in idx.tolist()])
        vis = model.vision_model(pixel_values=pix)
        img_emb = F.normalize(model.visual_projection(vis.pooler_output), dim=-1)
        txt = model.text_model(input_ids=ids, attention_mask=mask)
        txt_emb = F.normalize(model.text_projection(txt.last_hidden_state[:, 0, :]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * txt_emb @ img_emb.T
        # Same caption twice in a batch: both images count as right answers.
        same = torch.tensor([[captions[i] == captions[j] for j in idx.tolist()] for i in idx.tolist()],
                            dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        clip_loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                           + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        probe_loss = F.cross_entropy(probe(vis.last_hidden_state[:, 1:]).flatten(0, 1), targets[idx].flatten())
        layout_loss = (F.cross_entropy(image_layout(vis.pooler_output).view(-1, N_CLASSES), layouts[idx].flatten())
                       + F.cross_entropy(text_layout(txt.last_hidden_state[:, 0]).view(-1, N_CLASSES),
                                         layouts[idx].flatten()))
        loss = clip_loss + probe_loss + layout_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 25 == 0 or step == 0:
            log(f"  CLIP 第 {step + 1}/{steps} 步  对比损失 {clip_loss.item():.3f}  图块 {probe_loss.item():.3f}  "
                f"布局 {layout_loss.item():.3f}  已用 {time.time() - start:.0f}s")
    model.eval()
    return model


def image_embeddings(model: ChineseCLIPModel, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """L2-normalised projected image embeddings of uint8 images."""
    out = [model.get_image_features(pixel_values=normalize_uint8(images[s:s + batch])).pooler_output
           for s in range(0, images.shape[0], batch)]
    return F.normalize(torch.cat(out), dim=-1)


def text_embeddings(model: ChineseCLIPModel, tokenizer, texts: list[str]) -> torch.Tensor:
    ids, mask = _text_batch(tokenizer, texts)
    return F.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)


@torch.no_grad()
def text_to_image_top1(model: ChineseCLIPModel, tokenizer, images: torch.Tensor, captions: list[str]) -> float:
    """For each caption, is the most similar image one whose caption is that caption? (duplicates count)"""
    model.eval()
    best = (text_embeddings(model, tokenizer, captions) @ image_embeddings(model, images).T).argmax(1).tolist()
    return float(np.mean([captions[b] == captions[i] for i, b in enumerate(best)]))
