"""The only trainable part of Stage 1: vision features -> LLM embedding space."""
from __future__ import annotations

from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def build_projector(kind: str, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """``linear``: one Linear(D_v -> D_llm) (the course's Stage 1, 768*1024+1024 = 0.79M params at real size).
    ``mlp2x_gelu``: Linear -> GELU -> Linear, as in LLaVA-1.5."""
    if kind == "linear":
        return nn.Linear(vision_hidden, llm_hidden)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
    raise ValueError(f"未知的投影层类型 {kind!r}；可选：{', '.join(PROJECTOR_TYPES)}")
