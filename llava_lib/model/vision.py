"""The frozen vision tower: Chinese-CLIP's ViT, read at one layer, all 197 tokens, no post-layernorm."""
from __future__ import annotations

import torch
from torch import nn
from transformers import ChineseCLIPVisionModel


class VisionTower(nn.Module):
    """``[B, 3, 224, 224] -> [B, 197, D]``: CLS + 14x14 patch tokens of ``feature_layer``, as transformers' Llava
    with ``vision_feature_select_strategy="full"`` (so an export is exact). ``feature_layer`` counts like
    ``hidden_states`` (-1 the last layer, 1 the first); only the layers up to it run. Frozen, always in eval mode."""

    def __init__(self, vision_model: ChineseCLIPVisionModel, feature_layer: int = -1):
        super().__init__()
        n = len(vision_model.encoder.layers)
        index = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
        if not 1 <= index <= n:
            raise ValueError(f"feature_layer={feature_layer} 超出范围：视觉塔共有 {n} 层（可用 1..{n} 或 -1..-{n}）。")
        self.vision_model = vision_model
        self.feature_layer = feature_layer
        self.n_layers_used = index
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the caller asks
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return self.vision_model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        cfg = self.vision_model.config
        return 1 + (cfg.image_size // cfg.patch_size) ** 2

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        weight = vm.embeddings.patch_embedding.weight  # pixels may come from a CPU DataLoader: move them here
        h = vm.embeddings(pixel_values.to(device=weight.device, dtype=weight.dtype))  # [B, 197, D]
        h = vm.pre_layrnorm(h)
        for layer in vm.encoder.layers[: self.n_layers_used]:
            h = layer(h, None)
        return h  # [B, 197, D], before post_layernorm
