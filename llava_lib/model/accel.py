"""GPU training speed-ups that compute the same function as the plain path (numbers in docs/perf_notes.md); on
CUDA ``train.setup`` uses both: the fused head loss (``head_loss="auto"``) and regional compilation
(``accelerate``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .llava import StepOutput, labelled_positions, lean_causal_lm_loss


class _HeadCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i @ W^T, y_i)`` with ``d/dh`` computed in the forward, one chunk of rows at a time: no fp32
    ``[chunk, vocab]`` log-softmax (2.5 GB at chunk 4096) waits for the backward. Same arithmetic and dtypes as
    the plain path."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        # Back through the head as autograd would: the weight in the dtype the forward product used (autocast's).
        device = h.device.type
        w = weight.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) and need_grad else weight
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for s in range(0, h.shape[0], chunk):
            raw = F.linear(h[s:s + chunk], weight)                      # [c, V] (bf16 under autocast)
            raw_dtype = raw.dtype
            logits = raw.float()
            del raw
            y = targets[s:s + chunk]
            lse = torch.logsumexp(logits, dim=-1)                        # [c]
            total = total + (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_grad:
                p = logits.sub_(lse[:, None]).exp_()                    # softmax, in place
                p[rows[:y.shape[0]], y] -= 1.0                           # d(sum CE)/d(logits)
                grad_h[s:s + chunk] = torch.matmul(p.to(raw_dtype), w)  # the gradient in the logits' dtype
            del logits
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_total).to(ctx.h_dtype), None, None, None


def fused_lean_causal_lm_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4096):
    """Drop-in for :func:`llava_lib.model.llava.lean_causal_lm_loss` (same arguments, same ``StepOutput``)."""
    if getattr(lm_head, "bias", None) is not None:                      # Qwen3's head has none; stay exact otherwise
        return lean_causal_lm_loss(lm_head, hidden, labels, chunk)
    h, y = labelled_positions(hidden, labels)
    if y.numel() == 0:
        return StepOutput(hidden.sum() * 0.0, 0)
    return StepOutput(_HeadCrossEntropy.apply(h, lm_head.weight, y, chunk) / y.numel(), y.numel())


def _tower_layers(model) -> list[nn.Module]:
    vision = list(model.vision.vision_model.encoder.layers) if model.vision is not None else []
    return list(model.llm.model.layers) + vision


def compile_towers(model, *, backend: str = "inductor") -> None:
    """``torch.compile`` each decoder layer of the frozen LLM and vision tower in place. Identical layers share one
    compiled graph (compile time of one layer per tower); ``dynamic=True`` lets batches of any shape reuse it."""
    for layer in _tower_layers(model):
        layer.compile(dynamic=True, backend=backend)
    model.compiled_towers = True


def uncompile_towers(model) -> None:
    """Back to eager layers (``compile_towers`` undone); ``torch._dynamo.reset()`` drops all compiled code."""
    for layer in _tower_layers(model):
        layer._compiled_call_impl = None
    model.compiled_towers = False
    torch._dynamo.reset()
