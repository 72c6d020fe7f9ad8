"""The mini Qwen3: the real ``Qwen3ForCausalLM`` class at a small width, with the real Qwen tokenizer.

Two tricks keep it cheap on two CPU cores and make Stage 1 meaningful:

1. **The words of the mini world.** Only the few hundred token ids that the mini world's texts use get trained
   embeddings; every other row of the (tied) 151,936 x H embedding stays exactly zero, so its logit is exactly 0
   and the full-vocabulary softmax equals a softmax over the used ids plus one extra logit ``log(#unused)``. The
   training loss below is therefore the exact full-vocabulary cross-entropy, at a fraction of the cost.
2. **Reading word embeddings in the image block.** During pretraining the 197 ``<|image_pad|>`` slots of an image
   turn hold *word embeddings* laid out like the image: a patch in the top left covered by a red star holds
   ``emb(红色) + emb(星) + emb(左) + emb(上方)`` (the shape word only where the patch shows the outline:
   ``scenes.outline_patches``), the other slots hold ``emb(<|image_pad|>)`` (plus noise). The LM thus learns to read
   a picture made of words, as a real LLM reads its context. It never sees CLIP features: Stage 1 must learn a
   projection that turns CLIP's patch features into such word embeddings — LLaVA's alignment, in miniature.
3. **Voting over an object's patches.** The mini ViT gets most, not all, outline patches' shape right. So during
   pretraining each slot's *shape* word is replaced by a random shape with probability ``SHAPE_NOISE``: the LM
   learns to go with the shape most of the object's patches agree on, as a real LLM reads past noisy visual
   tokens. Measured (greedy captions of 100 held-out scenes, 800 steps, 4 layers): 0.99 right with the exact
   image words, 0.81-0.83 through a least-squares map from the mini CLIP's patch features (the best a linear
   projection fitted to the words, not to the LM's loss, does).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from ..model.llava import is_right_padded
from ..process import IGNORE_INDEX, IMAGE_PAD_ID, encode_conversation, num_image_tokens
from .corpus import conversation
from .scenes import COLORS, POSITIONS, SHAPES, Scene, patch_layout, patch_words

VOCAB_ROWS = 151936  # Qwen3-0.6B's embedding rows (the tokenizer uses the first 151,669)
SHAPE_NOISE = 0.1    # chance that a slot's shape word is replaced by a random shape during pretraining


def mini_llm_config(hidden: int = 64, layers: int = 3) -> Qwen3Config:
    # initializer_range 0.1 (~0.8/sqrt(hidden)) instead of Qwen's 0.02, which is sized for width 1024: at width 64
    # the 0.02 start leaves attention uniform for hundreds of steps, and reading *which* object sits *where* in
    # the image block (attention that depends on the position words just written) appears only much later.
    # Measured with perfect hints: caption accuracy 0.05 vs 0.30 after 100 steps, 0.93 after 600 (batch 24).
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
    """The token that stands for a word in the image block: its first token (三角形 -> 三角, 星形 -> 星).

    Not the mean of all its tokens: 三角形, 菱形 and 星形 share the token 形, which would blur them together.
    """
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
    """Token ids, labels and per-slot hint words for one conversation per scene."""
    rng = np.random.default_rng(seed)
    n_img = num_image_tokens()
    color_names, shape_names = list(COLORS), list(SHAPES)
    samples = []
    for scene in scenes:
        conv, with_image = conversation(scene, rng)
        # Rendered and tokenized with a one-slot image block, then widened: the same ids and labels as with all
        # 197 slots (<|image_pad|> is one special token, never merged; the slots carry no labels),
        # a quarter less time (8,000 conversations: 8.3 -> 6.2 s).
        ids, labels = encode_conversation(tokenizer, conv, 1, learn_thinking=True)
        if with_image:
            k = ids.index(IMAGE_PAD_ID)
            ids = ids[:k] + [IMAGE_PAD_ID] * n_img + ids[k + 1:]
            labels = labels[:k] + [labels[k]] * n_img + labels[k + 1:]
        slot_color = np.full(n_img, -1, dtype=np.int64)
        slot_shape = np.full(n_img, -1, dtype=np.int64)
        slot_cell = np.full(n_img, -1, dtype=np.int64)
        if with_image:
            owner, outline = patch_layout(scene)
            for i, o in enumerate(scene.objects):
                slot_color[1:][owner == i] = color_names.index(o.color)
                slot_shape[1:][(owner == i) & outline] = shape_names.index(o.shape)  # -1 inside: no shape word
                slot_cell[1:][owner == i] = o.cell
        samples.append((ids[:max_len], labels[:max_len], with_image, slot_color, slot_shape, slot_cell))
    return samples


class HintedLM(nn.Module):
    """Training-time wrapper: a small embedding table for the used ids, the Qwen3 body, tied head."""

    def __init__(self, tokenizer, vocab: UsedVocab, hidden: int, layers: int):
        super().__init__()
        self.vocab = vocab
        self.model = Qwen3ForCausalLM(mini_llm_config(hidden, layers))
        self.model.model.embed_tokens.weight.requires_grad_(False)  # rebuilt from `table` at save time
        self.table = nn.Parameter(torch.randn(len(vocab), hidden) * 0.5)
        # Rows of the table that stand for each colour / shape word in the image block.
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
        """``[B,197]`` object words per slot -> ``[B,197,H]`` slot embeddings.

        ``slot_color`` -1 = background; ``slot_shape`` -1 on an object's slot = no shape word (an interior patch).
        """
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

    def loss(self, ids, labels, attention_mask, has_image, slot_color, slot_shape, slot_cell, noise=0.3, drop=0.1,
             shape_noise=SHAPE_NOISE):
        embeds = self.table[self.vocab.compact(ids)]
        img_rows = has_image.nonzero().flatten()
        if len(img_rows):
            slots = ids[img_rows] == IMAGE_PAD_ID
            h = self.hints(slot_color[img_rows], slot_shape[img_rows], slot_cell[img_rows], noise, drop, shape_noise)
            sub = embeds[img_rows]
            sub[slots] = h.reshape(-1, h.shape[-1])
            embeds = embeds.index_copy(0, img_rows, sub)
        # Right-padded rows (``_pad_batch``) need no mask in a causal LM: a real token sees only earlier, real
        # tokens, and padding has no labels. Without it SDPA takes its causal kernel (measured: ~11% faster a step).
        if attention_mask is not None and is_right_padded(attention_mask):
            attention_mask = None
        hidden = self.model.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return exact_vocab_loss(hidden, labels, self.table, self.vocab, self.log_unused)

    def export(self) -> Qwen3ForCausalLM:
        """The plain Qwen3 model: trained rows in place, every other row zero (tied input/output)."""
        w = self.model.model.embed_tokens.weight
        with torch.no_grad():
            w.zero_()
            w[self.vocab.ids] = self.table.detach()
        self.model.tie_weights()
        return self.model


def exact_vocab_loss(hidden, labels, table, vocab: UsedVocab, log_unused: float) -> torch.Tensor:
    """Full-vocabulary next-token cross-entropy when every unused embedding row is zero (see module doc)."""
    targets = labels[:, 1:]
    sel = targets != IGNORE_INDEX
    h = hidden[:, :-1][sel]
    logits = h @ table.T
    logits = torch.cat([logits, logits.new_full((logits.shape[0], 1), log_unused)], dim=1)
    return F.cross_entropy(logits, vocab.compact(targets[sel]))


def _pad_batch(samples, pad_id):
    T = max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :len(s[0])] = torch.tensor(s[0])
        labels[b, :len(s[1])] = torch.tensor(s[1])
        mask[b, :len(s[0])] = 1
    has_image = torch.tensor([s[2] for s in samples])
    color = torch.from_numpy(np.stack([s[3] for s in samples]))
    shape = torch.from_numpy(np.stack([s[4] for s in samples]))
    cell = torch.from_numpy(np.stack([s[5] for s in samples]))
    return ids, labels, mask, has_image, color, shape, cell


def train_llm(tokenizer, scenes: list[Scene], *, steps: int = 600, batch: int = 24, lr: float = 3e-3,
              hidden: int = 64, layers: int = 3, seed: int = 0, log=print) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    samples = encode_corpus(tokenizer, scenes, seed)
    used = set(tokenizer.all_special_ids) | {t for s in samples for t in s[0]}
    used |= {t for w in list(COLORS) + list(SHAPES) + list(POSITIONS) for t in word_ids(tokenizer, w)}
    vocab = UsedVocab(used)
    lm = HintedLM(tokenizer, vocab, hidden, layers)
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = np.random.default_rng(seed)
    # Each batch is all image conversations (~270 tokens) or all text-only ones (~100), drawn in proportion: the
    # same mix of samples on average, without padding the short ones to the long ones' length (~15% less work).
    groups = [np.array([i for i, s in enumerate(samples) if s[2] == with_image]) for with_image in (True, False)]
    p_image = len(groups[0]) / len(samples)
    start = time.time()
    lm.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.95 + 0.05)
        pool = groups[0] if g.random() < p_image else groups[1]
        idx = g.choice(pool, size=batch, replace=False)
        loss = lm.loss(*_pad_batch([samples[i] for i in idx], tokenizer.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step == 0:
            log(f"  LLM 第 {step + 1}/{steps} 步  损失 {loss.item():.3f}  已用 {time.time() - start:.0f}s")
    lm.eval()
    return lm.export()


@torch.no_grad()
def image_word_matrix(llm: Qwen3ForCausalLM, tokenizer) -> torch.Tensor:
    """``[len(scenes.IMAGE_WORDS), H]``: the embeddings the LM learned to read in the image block, one row per image
    word (a colour's or shape's first token, the sum of a position word's tokens, the filler)."""
    emb = llm.get_input_embeddings().weight
    rows = [emb[hint_id(tokenizer, w)] for w in list(COLORS) + list(SHAPES)]
    rows += [emb[word_ids(tokenizer, w)].sum(0) for w in POSITIONS]
    return torch.stack(rows + [emb[IMAGE_PAD_ID]])


def image_word_regions(scene: Scene, tokenizer) -> list[tuple[str, np.ndarray, dict[str, list[int]]]]:
    """Each object of ``scene``, then the background: ``(name, patches, {kind: token ids})`` with the tokens the LM
    reads on those patches (``patch_words``): the colour's and the position's on all of an object's patches (the
    shape's only on its outline, so it is left out here), the filler ``<|image_pad|>`` on the background."""
    owner = patch_layout(scene)[0]
    regions = [(f"{o.position}的{o.color}{o.shape}", np.flatnonzero(owner == i),
                {"颜色词": [hint_id(tokenizer, o.color)], "位置词": word_ids(tokenizer, o.position)})
               for i, o in enumerate(scene.objects)]
    regions.append(("背景", np.flatnonzero(owner < 0), {"填充词 <|image_pad|>": [IMAGE_PAD_ID]}))
    return regions


def patch_hints(scene: Scene, words: torch.Tensor) -> torch.Tensor:
    """``[196, H]``: the slot embedding the LM expects at each patch of ``scene`` (``words``: image_word_matrix)."""
    return torch.from_numpy(patch_words(scene)) @ words
