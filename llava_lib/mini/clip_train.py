"""The mini Chinese-CLIP: the real ``ChineseCLIPModel`` class at a small width, trained contrastively.

ViT-B/16's geometry (224 px, patch 16 -> 197 tokens); only the widths are small. A real CLIP learns from 400M
pairs; ours has minutes of two CPU cores and 19,200 fresh scenes, so throw-away linear probes (not saved) speed it
up: on the patch tokens, each patch's object (what Stage 1 must read); on each side's pooled feature, the scene's
layout (which object sits in which cell), the structure the contrastive loss would otherwise find slowly.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChineseCLIPConfig, ChineseCLIPModel

from ..process import CLIP_MEAN, CLIP_STD
from .scenes import COLORS, GRID, IMAGE_WORDS, SHAPES, Scene, patch_layout, patch_words, render

COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
N_CELLS = GRID * GRID
# Probe targets factorised as (cell x colour) and (cell x shape): a sum of such codes (what attention over several
# objects' patches gives) still says, linearly, which colour and shape sit in which cell.
N_COLOR_CODES = 1 + N_CELLS * len(COLORS)
N_SHAPE_CODES = 1 + N_CELLS * len(SHAPES)
CODE_BLOCK = 16  # scene_code, per cell: 7 colour slots (0 = empty) + 6 shape slots (0 = empty) + 3 unused


def mini_clip_config(text_vocab_size: int, width: int = 96, layers: int = 3) -> ChineseCLIPConfig:
    # Width 96, wider than the mini LM's 64 as 768 -> 1024 in the real pair, so the Stage 1 projection changes width;
    # 3 layers pay for it (same 200-way retrieval as 4). The vision MLP is 2x the width, not ViT's 4x: 17% faster a
    # step and better read-out (retrieval 0.945 -> 0.995 at width 64); 1x retrieved worse (0.775).
    return ChineseCLIPConfig(
        text_config=dict(vocab_size=text_vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=96, pad_token_id=0,
                         initializer_range=0.1),  # BERT's 0.02 is sized for width 768; at 64 it learns slowly
        vision_config=dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=2 * width, image_size=224, patch_size=16, projection_dim=64),
        projection_dim=64,
    )


def init_grid_positions(vision_model, scale: float = 0.5) -> None:
    """Start the (trainable) patch position embeddings as 2-D sines and cosines of (row, column): a patch inside a
    flat-coloured shape learns the shape only once attention finds the object's other patches, sooner so."""
    emb = vision_model.embeddings.position_embedding.weight
    side = int(round((emb.shape[0] - 1) ** 0.5))
    quarter = emb.shape[1] // 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    freq = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    r, c = rows.flatten()[:, None] * freq, cols.flatten()[:, None] * freq
    grid = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)
    with torch.no_grad():
        emb.zero_()
        emb[1:, :grid.shape[1]] = scale * grid


def object_codes(o) -> tuple[int, int]:
    """(cell x colour, cell x shape) classes of one object; 0 means "no object"."""
    return 1 + o.cell * len(COLORS) + COLOR_INDEX[o.color], 1 + o.cell * len(SHAPES) + SHAPE_INDEX[o.shape]


def cell_targets(scene: Scene) -> np.ndarray:
    """``[2, cells]``: per cell, 0 if empty, else 1 + colour (row 0) and 1 + shape (row 1)."""
    out = np.zeros((2, N_CELLS), dtype=np.int64)
    for o in scene.objects:
        out[0, o.cell] = 1 + COLOR_INDEX[o.color]
        out[1, o.cell] = 1 + SHAPE_INDEX[o.shape]
    return out


def scene_codes(scenes, dim: int = 64) -> torch.Tensor:
    """``[N, dim]`` unit vectors spelling each scene (per cell a one-hot colour and shape) that both towers are
    pulled towards: scenes differing in one attribute of one cell sit at cosine 7/8, so retrieval works once each
    tower reads every cell right (what 400M pairs teach a real CLIP)."""
    assert dim >= N_CELLS * CODE_BLOCK
    out = np.zeros((len(scenes), dim), dtype=np.float32)
    for i, scene in enumerate(scenes):
        t = cell_targets(scene)
        for k in range(N_CELLS):
            out[i, k * CODE_BLOCK + t[0, k]] = 1.0
            out[i, k * CODE_BLOCK + 1 + len(COLORS) + t[1, k]] = 1.0
        out[i] /= np.linalg.norm(out[i])
    return torch.from_numpy(out)


def patch_targets(scene: Scene, layout: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``[2, 196]``: per patch, the covering object's :func:`object_codes` (0 = background; the shape class also 0
    on an interior patch). ``layout``: :func:`scenes.patch_layout` of the scene, when the caller has it already."""
    owner, outline = layout if layout is not None else patch_layout(scene)
    out = np.zeros((2, owner.shape[0]), dtype=np.int64)
    for i, o in enumerate(scene.objects):
        color, shape = object_codes(o)
        out[0, owner == i] = color
        out[1, (owner == i) & outline] = shape
    return out


def _char_targets(scenes, ids: torch.Tensor) -> torch.Tensor:
    """The text-side twin of :func:`patch_targets`: ``[2, B, T]``, per token of the char-level BERT ids the
    :func:`object_codes` of the object its clause describes (0 elsewhere; [CLS]/[SEP]/pad -100)."""
    out = torch.full((2, *ids.shape), -100, dtype=torch.long)
    for b, scene in enumerate(scenes):
        head = scene.caption.index("：") + 1
        cols, shps = [0] * head, [0] * head
        for o in scene.objects:
            n = len(f"{o.position}是一个{o.color}的{o.shape}")
            c, s = object_codes(o)
            cols += [c] * n + [0]  # then the comma or the final full stop
            shps += [s] * n + [0]
        assert len(cols) == len(scene.caption), scene.caption
        t = torch.tensor([cols, shps])[:, : ids.shape[1] - 2]
        out[:, b, 1:1 + t.shape[1]] = t
    return out


def render_batch(scenes) -> torch.Tensor:
    """``[B,3,224,224]`` uint8 pixels of freshly rendered scenes (0.3 ms each: cheaper than storing them)."""
    return torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes])).permute(0, 3, 1, 2).contiguous()


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` uint8 -> CLIP-normalised float (the numbers of ``process.clip_transform``), in one buffer."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)


def cosine_lr(base: float, step: int, steps: int, warmup: int = 15) -> float:
    """Linear warmup, then a cosine down to 5% of ``base``."""
    return base * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.95 + 0.05)


def optimizer_step(opt, loss: torch.Tensor, lr: float, clip_params=None) -> None:
    """One step at ``lr``; the gradient clipped to norm 1 when ``clip_params`` is given."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()


class _Heads(nn.Module):
    """Throw-away linear probes: per token (colour and shape codes) and per scene (layout), for one tower."""

    def __init__(self, width: int):
        super().__init__()
        self.color = nn.Linear(width, N_COLOR_CODES)
        self.shape = nn.Linear(width, N_SHAPE_CODES)
        self.layout_color = nn.Linear(width, N_CELLS * (1 + len(COLORS)))
        self.layout_shape = nn.Linear(width, N_CELLS * (1 + len(SHAPES)))

    def token_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(self.color(h).flatten(0, 1), targets[0].flatten())
                + F.cross_entropy(self.shape(h).flatten(0, 1), targets[1].flatten()))

    def layout_loss(self, pooled: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(self.layout_color(pooled).view(-1, 1 + len(COLORS)), layout[:, 0].flatten())
                + F.cross_entropy(self.layout_shape(pooled).view(-1, 1 + len(SHAPES)), layout[:, 1].flatten()))


def train_clip(scenes: list[Scene], tokenizer, *, vision_steps: int = 1000, steps: int = 200, batch: int = 16,
               text_steps: int = 300, text_batch: int = 32, text_scenes: list[Scene] | None = None,
               lr: float = 5e-3, seed: int = 0, log=print) -> ChineseCLIPModel:
    """Three phases with fixed step counts (deterministic for a seed): 1. the text side alone (cheap): per-character
    object codes and the layout from [CLS]; 2. the image side alone (``vision_steps``, ~1,000 as an interior patch
    learns its shape only once attention gathers the object's edges): per-patch object codes and the layout from the
    pooled feature; 3. both sides (``steps``): CLIP's contrastive loss on top.

    Phases 2 and 3 read ``scenes`` in order, each once (no memorising): give ``(vision_steps + steps) * batch``.
    There a throw-away linear head also regresses ``scenes.patch_words`` (the image words the mini LM reads) from
    the last patch tokens, so that *some* linear map to the LM's word space exists, as for a real CLIP and LLM; it
    needs no LM, so the two train at once. Stage 1 still has to find the map."""
    torch.manual_seed(seed)
    model = ChineseCLIPModel(mini_clip_config(len(tokenizer)))
    init_grid_positions(model.vision_model)
    width = model.config.vision_config.hidden_size
    vis_heads = _Heads(width)
    to_words = nn.Linear(width, len(IMAGE_WORDS))
    words_scale = float(np.stack([patch_words(s) for s in scenes[:64]]).mean())  # mean square of 0/1 targets
    txt_heads = _Heads(model.config.text_config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()

    def text_losses(batch_scenes, codes):
        enc = tokenizer([s.caption for s in batch_scenes], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        ids = enc["input_ids"]
        out = model.text_model(input_ids=ids, attention_mask=enc["attention_mask"], output_hidden_states=True)
        layout = torch.from_numpy(np.stack([cell_targets(s) for s in batch_scenes]))
        # The probes read the layer before the last, whose tokens the last layer's [CLS] attention gathers.
        tok = txt_heads.token_loss(out.hidden_states[-2], _char_targets(batch_scenes, ids))
        cls = out.last_hidden_state[:, 0]
        txt_emb = F.normalize(model.text_projection(cls), dim=-1)
        return txt_emb, tok, txt_heads.layout_loss(cls, layout) + (txt_emb - codes).pow(2).sum(-1).mean()

    # Phase 1: the text tower alone.
    text_scenes = text_scenes or scenes
    text_params = [p for m in (model.text_model, model.text_projection, txt_heads) for p in m.parameters()]
    opt = torch.optim.AdamW(text_params, lr=lr, weight_decay=0.01)
    for step in range(text_steps):
        idx = torch.randperm(len(text_scenes), generator=g)[:text_batch].tolist()
        batch_scenes = [text_scenes[i] for i in idx]
        _, tok, layout = text_losses(batch_scenes, scene_codes(batch_scenes, model.config.projection_dim))
        optimizer_step(opt, tok + layout, cosine_lr(lr, step, text_steps))
        if (step + 1) % 100 == 0:
            log(f"  CLIP 文本塔 第 {step + 1}/{text_steps} 步  字符 {tok.item():.3f}  布局 {layout.item():.3f}  "
                f"已用 {time.time() - start:.0f}s")

    # Phases 2 and 3 (one optimizer, one schedule): the image side alone, then both towers, on fresh scenes.
    total = vision_steps + steps
    if len(scenes) < total * batch:
        raise ValueError(f"需要至少 (vision_steps + steps) * batch = {total * batch} 个场景，只给了 {len(scenes)} 个。")
    params = [p for m in (model, vis_heads, txt_heads, to_words) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(total):
        batch_scenes = scenes[step * batch:(step + 1) * batch]
        owners = [patch_layout(s) for s in batch_scenes]  # one mask rendering per scene for both target kinds
        targets = torch.from_numpy(np.stack([patch_targets(s, lo) for s, lo in zip(batch_scenes, owners)]))
        targets = targets.transpose(0, 1)                                                                # [2,B,196]
        layouts = torch.from_numpy(np.stack([cell_targets(s) for s in batch_scenes]))                   # [B,2,cells]
        codes = scene_codes(batch_scenes, model.config.projection_dim)                                   # [B,dim]
        vis = model.vision_model(pixel_values=normalize_uint8(render_batch(batch_scenes)), output_hidden_states=True)
        img_emb = F.normalize(model.visual_projection(vis.pooler_output), dim=-1)
        if step >= vision_steps:
            txt_emb, char_loss, text_layout = text_losses(batch_scenes, codes)
            logits = model.logit_scale.exp().clamp(max=100) * txt_emb @ img_emb.T
            # Same caption twice in a batch: both images count as right answers.
            captions = [s.caption for s in batch_scenes]
            same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
            target = same / same.sum(1, keepdim=True)
            clip_loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                               + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        else:
            clip_loss = char_loss = text_layout = torch.zeros(())
        # Both the last layer (what Stage 1 reads) and the one before (what [CLS] gathers) say what each patch shows.
        patch_loss = (vis_heads.token_loss(vis.hidden_states[-2][:, 1:], targets)
                      + vis_heads.token_loss(vis.last_hidden_state[:, 1:], targets))
        image_layout = vis_heads.layout_loss(vis.pooler_output, layouts) + (img_emb - codes).pow(2).sum(-1).mean()
        loss = clip_loss + patch_loss + image_layout + char_loss + text_layout
        # The relative squared error of the linear read-out of the LM's image words.
        words = torch.from_numpy(np.stack([patch_words(s, lo) for s, lo in zip(batch_scenes, owners)]))
        loss = loss + F.mse_loss(to_words(vis.last_hidden_state[:, 1:]), words) / words_scale
        optimizer_step(opt, loss, cosine_lr(lr, step, total), params)
        if (step + 1) % 100 == 0 or step == 0:
            log(f"  CLIP 第 {step + 1}/{total} 步  对比损失 {clip_loss.item():.3f}  图块 {patch_loss.item():.3f}  "
                f"图片布局 {image_layout.item():.3f}  文本布局 {text_layout.item():.3f}  "
                f"已用 {time.time() - start:.0f}s")
    model.eval()
    return model

