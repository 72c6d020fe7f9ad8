"""LLaVA: frozen vision tower -> trainable projection -> Qwen3 (frozen in Stage 1, trained in Stage 2).

Shapes for the real models (mini world in brackets): pixels [B,3,224,224] -> vision [B,197,768 (96)]
-> projection [B,197,1024 (64)] -> written at the 197 ``<|image_pad|>`` positions of the input embeddings
-> Qwen3 -> hidden [B,T,1024 (64)] -> LM head only where a label exists -> cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..process import IGNORE_INDEX, IMAGE_PAD_ID
from .projector import build_projector
from .vision import VisionTower


@dataclass
class StepOutput:
    loss: torch.Tensor       # mean cross-entropy over label tokens
    n_label_tokens: int


class LlavaStage1(nn.Module):
    # A right-padded batch needs no attention mask in a causal LM: a real token only sees earlier, real tokens, so
    # the mask changes nothing where a label is, and without it SDPA runs its causal flash kernel (docs/perf_notes.md).
    drop_redundant_mask: bool = True

    def __init__(self, vision: VisionTower | None, llm: nn.Module, projector_type: str = "linear"):
        super().__init__()
        self.vision = vision
        self.llm = llm.requires_grad_(False).eval()
        self.image_token_id = IMAGE_PAD_ID
        self.projector_type = projector_type
        self.projector = None
        if vision is not None:
            # The projection stays fp32 whatever the towers' dtype (training it in bf16 would lose its small updates).
            self.projector = build_projector(projector_type, vision.hidden_size, llm.config.hidden_size).float()
            self.projector.to(self.device)
        # ``head_loss(lm_head, hidden, labels, chunk) -> StepOutput``: every choice (``train.pick_head_loss``) gives
        # the same value; they differ in memory and speed.
        self.head_loss = lean_causal_lm_loss
        self.llm_trainable = False
        self.peft = None  # the peft wrapper when Stage 2 trains LoRA adapters (its weights live inside self.llm)

    def unfreeze_llm(self, lora: dict | None = None, train_embeddings: bool = True) -> None:
        """Stage 2: the LLM learns too, all of it (``train_embeddings=False``: not the embeddings and a head tied to
        them), or only LoRA adapters on attention (``lora``: r, alpha). peft puts the adapters into ``self.llm`` in
        place (its wrapper, kept in ``self.peft``, saves and merges them), so the forward below is unchanged."""
        if lora:
            from peft import LoraConfig, get_peft_model
            config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.05,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            self.peft = get_peft_model(self.llm, config)
        else:
            self.llm.requires_grad_(True)
            if not train_embeddings:
                self.llm.get_input_embeddings().requires_grad_(False)
                self.llm.get_output_embeddings().requires_grad_(False)
        self.llm_trainable = True

    # The vision tower never leaves eval mode; the LLM only in Stage 2 (gradient checkpointing acts in train mode).
    def train(self, mode: bool = True):
        self.training = mode
        if self.projector is not None:
            self.projector.train(mode)
        if self.llm_trainable:
            self.llm.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens if self.vision is not None else 0

    def project_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N,3,224,224] -> [N,197,D_llm]`` in the projection's dtype (fp32, or bf16 under autocast)."""
        feats = self.vision(pixel_values.to(self.device))           # no_grad inside, [N,197,D_v]
        return self.projector(feats.to(next(self.projector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the projected image features written at the ``<|image_pad|>`` positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)          # [B,T,D_llm], frozen
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        image_features = None if pixel_values is None else self.project_images(pixel_values)
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"图片占位符数量（{n_slots} 个 <|image_pad|>）与图片特征数量（{n_feats}）不一致。"
                f"每张图片应对应 {self.num_image_tokens} 个占位符；请用 llava_lib.process 构造输入。")
        if n_slots == 0:
            return embeds
        # masked_scatter keeps the autograd path from the projection into the LLM's activations.
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None) -> StepOutput:
        """The lean loss: the LM head runs only at positions whose next token has a label."""
        input_ids = input_ids.to(self.device)
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is not None and self.drop_redundant_mask and is_right_padded(attention_mask):
            attention_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        # use_cache=False: a training forward has no use for a KV cache (the config's default would build one).
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head_loss(self.llm.lm_head, hidden, labels.to(self.device))


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ``1 ... 1 0 ... 0`` (what ``process.collate`` builds): no 0 before a 1."""
    m = attention_mask.bool()
    return not bool((m[:, 1:] & ~m[:, :-1]).any())


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``[N, D]`` that predict a label, and those labels ``[N]`` (shift by one, skip -100)."""
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    return hidden[:, :-1][selected], targets[selected]


def lean_causal_lm_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                        chunk: int = 4096) -> StepOutput:
    """Mean next-token cross-entropy, evaluating the (151,936-way) head only at labelled positions: equal to
    transformers' causal-LM loss without ever building ``[B, T, vocab]`` logits (rows in chunks bound their memory)."""
    h, y = labelled_positions(hidden, labels)
    n = y.numel()
    if n == 0:
        return StepOutput(hidden.sum() * 0.0, 0)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        logits = lm_head(h[s:s + chunk]).float()
        total = total + F.cross_entropy(logits, y[s:s + chunk], reduction="sum")
    return StepOutput(total / n, n)
