"""The mini world's exact, cheaper LM head (plugged in through ``TrainConfig.head_loss``).

The mini Qwen3's tied head has 151,936 rows of which only the ~130 its world's texts use are non-zero; both the
loss and the logits can skip the zero rows exactly.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.llava import StepOutput, labelled_positions, lean_causal_lm_loss


def zero_rows_head_loss(lm_head: nn.Module, min_zero_fraction: float = 0.5):
    """An exact, cheaper head loss for a frozen LM head whose rows are mostly exactly zero; else the general one.

    The mini Qwen3 trains only the ~110 embedding rows its world's texts use; the other 151,826 rows of its tied
    151,936-row head are exactly 0, so their logits are exactly 0 whatever the hidden state. Then
    ``logsumexp(all logits) = logsumexp(live logits, log(#zero rows))`` and a zero row's target logit is 0: the
    full-vocabulary cross-entropy, computed with a 110-row matrix product instead of a 151,936-row one (the head
    was most of a mini Stage 1 step on a CPU). A real LLM has no zero rows and keeps the general loss.
    """
    w = lm_head.weight
    if getattr(lm_head, "bias", None) is not None or w.requires_grad:
        return lean_causal_lm_loss
    live = live_rows_head(lm_head)  # the captions generated during training decode through the same head
    n_zero = w.shape[0] - live.numel()
    if n_zero < min_zero_fraction * w.shape[0]:
        lm_head.__dict__.pop("forward", None)
        return lean_causal_lm_loss
    index = torch.full((w.shape[0],), -1, dtype=torch.long, device=w.device)
    index[live] = torch.arange(live.numel(), device=w.device)
    log_zero = math.log(n_zero)

    def loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> StepOutput:
        h, y = labelled_positions(hidden, labels)
        n = y.numel()
        if n == 0:
            return StepOutput(hidden.sum() * 0.0, 0)
        logits = (h @ head.weight[live].T).float()
        lse = torch.logsumexp(torch.cat([logits, logits.new_full((n, 1), log_zero)], dim=1), dim=1)
        j = index[y]
        target = logits.gather(1, j.clamp(min=0)[:, None])[:, 0].masked_fill(j < 0, 0.0)
        return StepOutput((lse - target).sum() / n, n)

    return loss


def _live_rows_forward(lm_head: nn.Module, live: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    w, live = lm_head.weight, live.to(lm_head.weight.device)
    logits = hidden.new_zeros(*hidden.shape[:-1], w.shape[0])
    logits[..., live] = F.linear(hidden, w[live])
    return logits


def live_rows_head(lm_head: nn.Module) -> torch.Tensor:
    """Let a frozen head whose rows are mostly exactly zero multiply only its live rows.

    A zero row's logit is exactly 0 and a live row's is the same dot product as in the full product (bit for bit,
    tested), so decoding is unchanged; the full 151,936-row product was most of a mini decode step on a CPU.
    Returns the indices of the live rows.
    """
    with torch.no_grad():
        live = (lm_head.weight != 0).any(dim=1).nonzero().flatten()
    lm_head.forward = functools.partial(_live_rows_forward, lm_head, live)
    return live
