"""The mini world's exact, cheaper LM head (through ``TrainConfig.head_loss``): only ~130 of the mini Qwen3's 151,936
tied head rows are non-zero, and a zero row's logit is exactly 0, so the loss and the logits can skip those rows."""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.llava import StepOutput, labelled_positions, lean_causal_lm_loss


def zero_rows_head_loss(lm_head: nn.Module, min_zero_fraction: float = 0.5):
    """For a frozen head whose rows are mostly exactly zero: the full-vocabulary cross-entropy from the live rows,
    ``logsumexp(all) = logsumexp(live logits, log(#zero rows))`` (the head was most of a mini Stage 1 step on a
    CPU). Otherwise the general loss."""
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
    """Make a frozen, mostly-zero head multiply only its live rows (bit for bit the same logits: decoding is
    unchanged, and the full product was most of a mini decode step on a CPU). Returns the live rows' indices."""
    with torch.no_grad():
        live = (lm_head.weight != 0).any(dim=1).nonzero().flatten()
    lm_head.forward = functools.partial(_live_rows_forward, lm_head, live)
    return live
