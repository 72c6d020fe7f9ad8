"""The mini Qwen3: the real ``Qwen3ForCausalLM`` class at a small width, with the real Qwen tokenizer.

1. **Only the mini world's words.** Only the ~130 token ids its texts use get trained embeddings; every other row
   of the tied 151,936-row table stays exactly zero (logit exactly 0), so the full-vocabulary cross-entropy is a
   softmax over the used ids plus one logit ``log(#unused)``: exact, at a fraction of the cost.
2. **A picture made of words.** In pretraining the 197 ``<|image_pad|>`` slots hold word embeddings laid out like
   the image (``scenes.patch_words``): a top-left patch of a red star holds ``emb(红色) + emb(星) + emb(左) + emb(上方)``
   (the shape word only on outline patches), background slots ``emb(<|image_pad|>)``, plus noise. The LM never
   sees CLIP features: Stage 1 must learn a projection onto these words, LLaVA's alignment in miniature.
3. **Voting over an object's patches.** The mini ViT gets most, not all, outline patches' shape right, so each
   slot's shape word is replaced by a random shape with probability ``SHAPE_NOISE``: the LM learns to go with
   the majority (measured: greedy captions through a least-squares map from CLIP features 0.81-0.83 right).
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import Qwen3Config, Qwen3ForCausalLM

from ..process import IGNORE_INDEX, IMAGE_PAD_ID, encode_conversation, num_image_tokens
from .clip_train import cosine_lr, optimizer_step
from .corpus import conversation
from .scenes import COLORS, POSITIONS, SHAPES, Scene, patch_layout

VOCAB_ROWS = 151936  # Qwen3-0.6B's embedding rows (the tokenizer uses the first 151,669)
SHAPE_NOISE = 0.1    # chance that a slot's shape word is replaced by a random shape during pretraining


def mini_llm_config(hidden: int = 64, layers: int = 3) -> Qwen3Config:
    # initializer_range 0.1, not Qwen's 0.02 (sized for width 1024): at width 64 the 0.02 start leaves attention
    # uniform for hundreds of steps (captions right after 100 steps with perfect hints: 0.05 vs 0.30).
    return Qwen3Config(
        vocab_size=VOCAB_ROWS, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        initializer_range=0.1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=151645, pad_token_id=151643,
    )


def word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False)["input_ids"]


def hint_id(tokenizer, word: str) -> int:
    """A word's first token stands for it in the image block (三角形 -> 三角): 三角形, 菱形 and 星形 share 形."""
    return word_ids(tokenizer, word)[0]


class UsedVocab:
    """Maps the used token ids to rows of a small trainable table."""

    def __init__(self, ids):
        self.ids = sorted(set(int(i) for i in ids))
        self.index = torch.full((VOCAB_ROWS,), -1, dtype=torch.long)
        self.index[self.ids] = torch.arange(len(self.ids))

    def __len__(self):
        return len(self.ids)

    def compact(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.index[ids.clamp(min=0)]
        if (out[ids >= 0] < 0).any():
            raise ValueError("出现了迷你词表之外的词元；请重新构建迷你世界。")
        return out


def encode_corpus(tokenizer, scenes: list[Scene], seed: int, max_len: int = 320):
    """Per scene: ids, labels, whether it shows the image, and per slot its object's colour, shape, cell (-1: none;
    shape also -1 on an interior patch)."""
    rng = np.random.default_rng(seed)
    n_img = num_image_tokens()
    samples = []
    for scene in scenes:
        conv, with_image = conversation(scene, rng)
        # Tokenized with one image slot, then widened: the same ids and labels as with 197, a quarter faster.
        ids, labels = encode_conversation(tokenizer, conv, 1, learn_thinking=True)
        color, shape, cell = np.full((3, n_img), -1, dtype=np.int64)
        if with_image:
            k = ids.index(IMAGE_PAD_ID)
            ids = ids[:k] + [IMAGE_PAD_ID] * n_img + ids[k + 1:]
            labels = labels[:k] + [labels[k]] * n_img + labels[k + 1:]
            owner, outline = patch_layout(scene)
            for i, o in enumerate(scene.objects):
                color[1:][owner == i] = list(COLORS).index(o.color)
                shape[1:][(owner == i) & outline] = SHAPES.index(o.shape)
                cell[1:][owner == i] = o.cell
        samples.append((ids[:max_len], labels[:max_len], with_image, color, shape, cell))
    return samples


class HintedLM(nn.Module):
    """Training-time wrapper: a small embedding table for the used ids, the Qwen3 body, tied head."""

    def __init__(self, tokenizer, vocab: UsedVocab, hidden: int, layers: int):
        super().__init__()
        self.vocab = vocab
        self.model = Qwen3ForCausalLM(mini_llm_config(hidden, layers))
        self.model.model.embed_tokens.weight.requires_grad_(False)  # rebuilt from `table` at save time
        self.table = nn.Parameter(torch.randn(len(vocab), hidden) * 0.5)
        self.register_buffer("color_rows", vocab.compact(torch.tensor([hint_id(tokenizer, w) for w in COLORS])))
        self.register_buffer("shape_rows", vocab.compact(torch.tensor([hint_id(tokenizer, w) for w in SHAPES])))
        # A position word's tokens (左 + 上方 ...): content the LM can match when it writes "左上方是一个...".
        where = torch.zeros(len(POSITIONS), len(vocab))
        for r, w in enumerate(POSITIONS):
            where[r, vocab.compact(torch.tensor(word_ids(tokenizer, w)))] = 1.0
        self.register_buffer("position_sum", where)
        self.pad_row = int(vocab.compact(torch.tensor([IMAGE_PAD_ID]))[0])
        self.log_unused = math.log(VOCAB_ROWS - len(vocab))

    def hints(self, slot_color: torch.Tensor, slot_shape: torch.Tensor, slot_cell: torch.Tensor, noise: float,
              drop: float, shape_noise: float = 0.0) -> torch.Tensor:
        """``[B,197]`` object words per slot (as :func:`encode_corpus`) -> ``[B,197,H]`` slot embeddings."""
        if shape_noise > 0:  # see the module doc, point 3
            flip = (torch.rand(slot_shape.shape) < shape_noise) & (slot_shape >= 0)
            slot_shape = torch.where(flip, torch.randint_like(slot_shape, len(SHAPES)), slot_shape)
        colors = self.table[self.color_rows]
        shapes = self.table[self.shape_rows]
        is_obj = slot_color >= 0
        if drop > 0:
            is_obj = is_obj & (torch.rand(is_obj.shape) >= drop)
        cells = self.position_sum @ self.table
        shape_words = torch.where((slot_shape >= 0).unsqueeze(-1), shapes[slot_shape.clamp(min=0)], 0.0)
        obj = colors[slot_color.clamp(min=0)] + shape_words + cells[slot_cell.clamp(min=0)]
        out = torch.where(is_obj.unsqueeze(-1), obj, self.table[self.pad_row].expand_as(obj))
        if noise > 0:
            out = out + noise * self.table.detach().std() * torch.randn_like(out)
        return out

    def loss(self, ids, labels, has_image, slot_color, slot_shape, slot_cell, noise=0.3, drop=0.1,
             shape_noise=SHAPE_NOISE):
        embeds = self.table[self.vocab.compact(ids)]
        img_rows = has_image.nonzero().flatten()
        if len(img_rows):
            slots = ids[img_rows] == IMAGE_PAD_ID
            h = self.hints(slot_color[img_rows], slot_shape[img_rows], slot_cell[img_rows], noise, drop, shape_noise)
            sub = embeds[img_rows]
            sub[slots] = h.reshape(-1, h.shape[-1])
            embeds = embeds.index_copy(0, img_rows, sub)
        # Right padding needs no mask in a causal LM (padding has no labels); without one SDPA takes its causal
        # kernel, ~11% faster a step.
        hidden = self.model.model(inputs_embeds=embeds).last_hidden_state
        # The exact full-vocabulary cross-entropy: every unused row is zero, its logit 0 (module doc, point 1).
        targets = labels[:, 1:]
        sel = targets != IGNORE_INDEX
        logits = hidden[:, :-1][sel] @ self.table.T
        logits = torch.cat([logits, logits.new_full((logits.shape[0], 1), self.log_unused)], dim=1)
        return F.cross_entropy(logits, self.vocab.compact(targets[sel]))

    def export(self) -> Qwen3ForCausalLM:
        """The plain Qwen3 model: trained rows in place, every other row zero (tied input/output)."""
        w = self.model.model.embed_tokens.weight
        with torch.no_grad():
            w.zero_()
            w[self.vocab.ids] = self.table.detach()
        self.model.tie_weights()
        return self.model


def _pad_batch(samples, pad_id):
    """Right-padded ids and labels, then the image flag and the slot words of :func:`encode_corpus`."""
    ids = pad_sequence([torch.tensor(s[0]) for s in samples], batch_first=True, padding_value=pad_id)
    labels = pad_sequence([torch.tensor(s[1]) for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
    slots = [torch.from_numpy(np.stack([s[k] for s in samples])) for k in (3, 4, 5)]
    return ids, labels, torch.tensor([s[2] for s in samples]), *slots


def train_llm(tokenizer, scenes: list[Scene], *, steps: int = 600, batch: int = 24, lr: float = 3e-3,
              hidden: int = 64, layers: int = 3, seed: int = 0, log=print) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    samples = encode_corpus(tokenizer, scenes, seed)
    used = set(tokenizer.all_special_ids) | {t for s in samples for t in s[0]}
    used |= {t for w in list(COLORS) + list(SHAPES) + list(POSITIONS) for t in word_ids(tokenizer, w)}
    lm = HintedLM(tokenizer, UsedVocab(used), hidden, layers)
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = np.random.default_rng(seed)
    # Each batch is all image conversations (~270 tokens) or all text-only ones (~100), drawn in proportion: the
    # same mix on average, without padding the short ones to the long ones' length (~15% less work).
    groups = [np.array([i for i, s in enumerate(samples) if s[2] == with_image]) for with_image in (True, False)]
    p_image = len(groups[0]) / len(samples)
    start = time.time()
    lm.train()
    for step in range(steps):
        pool = groups[0] if g.random() < p_image else groups[1]
        idx = g.choice(pool, size=batch, replace=False)
        loss = lm.loss(*_pad_batch([samples[i] for i in idx], tokenizer.pad_token_id))
        optimizer_step(opt, loss, cosine_lr(lr, step, steps, warmup=30), params)
        if (step + 1) % 100 == 0 or step == 0:
            log(f"  LLM 第 {step + 1}/{steps} 步  损失 {loss.item():.3f}  已用 {time.time() - start:.0f}s")
    lm.eval()
    return lm.export()


def image_word_regions(scene: Scene, tokenizer) -> list[tuple[str, np.ndarray, dict[str, list[int]]]]:
    """Each object of ``scene``, then the background: ``(name, patches, {kind: token ids})``, the tokens the LM reads
    on all those patches (``patch_words``; an object's shape is left out, being only on its outline)."""
    owner = patch_layout(scene)[0]
    regions = [(f"{o.position}的{o.color}{o.shape}", np.flatnonzero(owner == i),
                {"颜色词": [hint_id(tokenizer, o.color)], "位置词": word_ids(tokenizer, o.position)})
               for i, o in enumerate(scene.objects)]
    regions.append(("背景", np.flatnonzero(owner < 0), {"填充词 <|image_pad|>": [IMAGE_PAD_ID]}))
    return regions

