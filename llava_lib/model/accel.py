"""Speed-ups for a GPU, each one computing the same function as the plain path (docs/perf_notes.md has the numbers).

Training (``train.setup`` uses both on CUDA: ``TrainConfig.head_loss="auto"`` picks the fused loss, and
``TrainConfig.accelerate`` (``--no-accelerate`` turns it off) compiles the towers):

* :func:`fused_lean_causal_lm_loss` — the lean loss with the head's gradient computed chunk by chunk inside the
  forward, so no ``[chunk, 151936]`` logits are kept for the backward (same value, same gradient).
* :func:`compile_towers` — ``torch.compile`` of each decoder layer of the frozen LLM and of the vision tower
  ("regional compilation": the 28 identical layers share one compiled graph). Fuses RMSNorm, rotary, SiLU*mul and
  the residual adds, and lets the partitioner keep only what the activation backward needs.

Decoding (on by default on CUDA, off on CPU; ``LLAVA_FAST_DECODE=0/1`` or ``generate_tokens(..., fast=)`` decide):

* :class:`FastDecoder` — a static KV cache and CUDA graphs for the one-token decode step. Default mode ``static``:
  the whole step is one graph, attention over the static cache with a length mask (same function, bf16 rounding
  differs from the dynamic cache; fp32 gives the same greedy tokens). Mode ``exact`` (``LLAVA_FAST_DECODE_MODE``):
  transformers' own attention between per-layer graphs on exact-length views, bit-identical to the plain path when
  its attention kernel is deterministic, and slower.

Nothing here is imported by the plain path at import time; ``chat`` imports it lazily.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------- training


class _HeadCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i @ W^T, y_i)`` with ``d/dh`` computed in the forward, one chunk of rows at a time.

    The plain path keeps each chunk's fp32 log-softmax ([chunk, vocab], 2.5 GB at chunk 4096) until the backward;
    here each chunk's ``softmax - onehot`` is turned into ``[chunk, D]`` gradient rows at once and dropped.
    The arithmetic is the plain path's: logits in the head's dtype (bf16 under autocast), upcast to fp32, the
    gradient cast back to that dtype before the ``@ W`` product.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
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
                # Back through the head as autograd would: the gradient in the logits' dtype, times the weight in
                # the dtype the forward product used.
                grad_h[s:s + chunk] = torch.matmul(p.to(raw_dtype), _cast_like_autocast(weight, h))
            del logits
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_total).to(ctx.h_dtype), None, None, None


def _cast_like_autocast(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The weight in the dtype the head's matmul used in the forward (autocast's dtype, if autocast is on)."""
    if torch.is_autocast_enabled(h.device.type):
        return weight.to(torch.get_autocast_dtype(h.device.type))
    return weight


def fused_lean_causal_lm_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4096):
    """Drop-in for :func:`llava_lib.model.llava.lean_causal_lm_loss` (same arguments, same ``StepOutput``)."""
    from .llava import StepOutput, labelled_positions
    h, y = labelled_positions(hidden, labels)
    n = y.numel()
    if n == 0:
        return StepOutput(hidden.sum() * 0.0, 0)
    if getattr(lm_head, "bias", None) is not None:                      # Qwen3's head has none; stay exact otherwise
        from .llava import lean_causal_lm_loss
        return lean_causal_lm_loss(lm_head, hidden, labels, chunk)
    total = _HeadCrossEntropy.apply(h, lm_head.weight, y, chunk)
    return StepOutput(total / n, n)


def _decoder_layers(model, vision: bool = True) -> list[nn.Module]:
    layers = list(model.llm.model.layers)
    if vision and getattr(model, "vision", None) is not None:
        layers += list(model.vision.vision_model.encoder.layers)
    return layers


def compile_towers(model, *, dynamic: bool | None = True, backend: str = "inductor", mode: str | None = None,
                   vision: bool = True) -> int:
    """``torch.compile`` every decoder layer of the frozen LLM (and, with ``vision``, of the vision tower) in place.

    Regional compilation: identical layers share one compiled graph, so compile time is that of one layer (per
    tower), not of the whole model. ``dynamic=True`` traces batch size and sequence length symbolically, so
    length-grouped batches of any shape reuse the same graph. Returns the number of layers wrapped.
    """
    layers = _decoder_layers(model, vision)
    kwargs = {"dynamic": dynamic, "backend": backend}
    if mode is not None:
        kwargs["mode"] = mode
    for layer in layers:
        layer.compile(**kwargs)
    model.compiled_towers = True
    return len(layers)


def uncompile_towers(model) -> None:
    """Back to eager layers (``compile_towers`` undone); ``torch._dynamo.reset()`` drops all compiled code."""
    for layer in _decoder_layers(model):
        layer._compiled_call_impl = None
    model.compiled_towers = False
    import torch._dynamo
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- decoding


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


DECODE_MODES = ("static", "exact")


def decode_mode(mode: str | None = None) -> str:
    """``mode`` if given, else ``LLAVA_FAST_DECODE_MODE`` (``static`` / ``exact``), else ``static``."""
    value = (mode or os.environ.get("LLAVA_FAST_DECODE_MODE") or "static").strip().lower()
    if value not in DECODE_MODES:
        raise ValueError(f"未知的解码模式 {value!r}（可选：{', '.join(DECODE_MODES)}）")
    return value


def unsupported_reason(llm) -> str | None:
    """Why :class:`FastDecoder` cannot serve ``llm`` (None when it can)."""
    cfg = getattr(llm, "config", None)
    if getattr(cfg, "model_type", None) != "qwen3":
        return f"model_type={getattr(cfg, 'model_type', None)!r} (only qwen3)"
    model = getattr(llm, "model", None)
    if model is None or not hasattr(model, "layers") or not hasattr(model, "rotary_emb"):
        return "unexpected module layout"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window layers"
    if getattr(model.rotary_emb, "rope_type", "default") != "default":
        return f"rope_type={model.rotary_emb.rope_type!r}"
    return None


def _layer_pre(layer, h, cos, sin, pos, k_cache, v_cache, rope, head_dim: int, qk_norm: bool):
    """Layer up to its attention: norm, q/k/v, q/k norms, rotary; K/V written at ``pos`` of the static cache."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, head_dim)
    q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    return q


def _layer_post(layer, h, a):
    """Layer after its attention: o_proj + residual, then the MLP block + residual."""
    a = a.reshape(*h.shape[:-1], -1).contiguous()
    h = h + layer.self_attn.o_proj(a)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _attend_masked(layer, q, k_cache, v_cache, mask):
    """Static mode: attention of the one query over the whole static cache, positions after it masked.

    Grouped-query attention without repeating K/V: the query heads of one KV head are one matrix
    (``[1, kv, group, hd]``, the head order of ``repeat_kv``). The precision of the fused attention kernels
    (flash, cuDNN): scores and softmax in fp32, the probabilities rounded to the model dtype for the product
    with V (fp32 accumulation). transformers' eager attention rounds the scores to bf16 first, which is
    noticeably noisier.
    """
    b, h, s, d = q.shape                                                 # s == 1
    kv = k_cache.shape[1]
    qg = q.reshape(b, kv, (h // kv) * s, d)
    scores = torch.matmul(qg.float(), k_cache.float().transpose(2, 3)) * layer.self_attn.scaling + mask
    w = torch.softmax(scores, dim=-1).to(q.dtype)                         # [1,kv,g,M]
    out = torch.matmul(w, v_cache)                                       # [1,kv,g,hd]
    return out.reshape(b, h, s, d).transpose(1, 2)                       # [1,1,H,hd]


def _static_layer(layer, h, cos, sin, mask, pos, k_cache, v_cache, rope, head_dim: int, qk_norm: bool):
    """One decoder layer of a static-mode step (what ``torch.compile`` fuses when the decoder compiles)."""
    q = _layer_pre(layer, h, cos, sin, pos, k_cache, v_cache, rope, head_dim, qk_norm)
    return _layer_post(layer, h, _attend_masked(layer, q, k_cache, v_cache, mask))


_COMPILED_LAYER: dict = {}


def _compiled_static_layer(backend: str = "inductor"):
    """``torch.compile(_static_layer)``, one per backend: every layer of every decoder shares it (the layer's
    weights are inputs of the graph, so the 28 layers reuse one graph per dtype)."""
    fn = _COMPILED_LAYER.get(backend)
    if fn is None:
        fn = _COMPILED_LAYER[backend] = torch.compile(_static_layer, dynamic=False, backend=backend)
    return fn


class FastDecoder:
    """One-token decode steps of a Qwen3 LLM on a static KV cache, replayed as CUDA graphs.

    Two modes (``mode=`` or ``LLAVA_FAST_DECODE_MODE``):

    * ``static`` (default): the whole step — embedding, 28 layers, norm, head — is one CUDA graph. Each layer
      writes its K/V at the current position of the static cache and attends over the *whole* cache with a length
      mask (positions after the current one get ``-inf``, i.e. weight exactly 0), written out as two matmuls and an
      fp32 softmax, so no attention backend is chosen per length and nothing is built per length. The same function
      as the plain path; the rounding differs (another attention kernel, a longer softmax row), so bf16 logits
      agree to bf16 precision, not bit for bit (fp32: the same greedy tokens). One graph launch per token.
    * ``exact``: ``N+1`` graphs per step (embedding + rotary + layer 0's pre-attention; then for each layer its
      post-attention MLP and the next layer's pre-attention; last: norm + head) and, between them, transformers' own
      attention function on exact-length views ``cache[:, :, :length]`` — the plain path's attention call on the
      plain path's shapes, so the logits are bit-identical whenever that attention kernel is deterministic (checked
      once after capture; on a mismatch the decoder runs the same pieces eagerly instead). Slower: 28 eager
      attention calls per token from Python, and on Hopper cuDNN builds an attention plan per new length.

    On a CPU, or with ``use_cuda_graphs=False``, the pieces run eagerly (used by the tests).
    Use: ``load(cache)`` after a prefill with transformers' cache, then ``step(token) -> logits [vocab]``.
    """

    def __init__(self, llm, max_len: int, use_cuda_graphs: bool | None = None, mode: str | None = None,
                 compile: bool | None = None, compile_backend: str = "inductor"):
        reason = unsupported_reason(llm)
        if reason:
            raise ValueError(f"FastDecoder 不支持这个模型：{reason}")
        self.mode = decode_mode(mode)
        # No reference to ``llm`` itself: the per-model registry holds it weakly, so a dropped model frees its decoder.
        model = self.model = llm.model
        self.lm_head = llm.lm_head
        cfg = self.config = llm.config
        self.layers = list(model.layers[: cfg.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        self.rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_len = int(max_len)
        kv = (1, cfg.num_key_value_heads, self.max_len, self.head_dim)
        self.k_cache = [torch.zeros(kv, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(kv, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.tok = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos_ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = self.pos_ids.view(1)
        # static mode: the length mask is computed inside the graph from ``pos_ids``
        self._positions = torch.arange(self.max_len, device=self.device).view(1, 1, 1, self.max_len)
        self._zero = torch.zeros((), dtype=torch.float32, device=self.device)
        self._ninf = torch.full((), float("-inf"), dtype=torch.float32, device=self.device)
        self.length = 0
        self.lock = threading.Lock()
        self.graphs: list | None = None
        self.graph_check: dict = {"captured": False}
        self.contiguous_kv = False   # exact mode, set by _calibrate: whether the attention needs contiguous K/V
        if use_cuda_graphs is None:
            use_cuda_graphs = self.device.type == "cuda" and _env_flag("LLAVA_CUDA_GRAPHS") is not False
        if compile is None:
            compile = _env_flag("LLAVA_FAST_DECODE_COMPILE")
            compile = self.device.type == "cuda" if compile is None else compile
        self.compiled = bool(compile) and self.mode == "static"
        self.compile_info: dict = {"requested": self.compiled}
        self._layer_fn = _static_layer
        if self.compiled:
            self._compile(compile_backend)
        if self.mode == "exact":
            with torch.no_grad():
                self._calibrate()
        if use_cuda_graphs:
            try:
                with torch.no_grad():
                    self._capture_static() if self.mode == "static" else self._capture()
            except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager pieces (same results)
                self.graphs = None
                self.graph_check = {"captured": False, "error": f"{type(e).__name__}: {e}"[:300]}
                warnings.warn(f"[llava_lib] CUDA graph 捕获失败，解码改用逐段执行（结果相同，速度较慢）：{e}")
        self._clear(0)

    # -- the pieces of one step ----------------------------------------------------------------------------
    def _attention(self):
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        eager = getattr(sys.modules[type(self.layers[0].self_attn).__module__], "eager_attention_forward")
        if impl == "eager":
            return eager
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
        return get(impl, eager) if get is not None else ALL_ATTENTION_FUNCTIONS[impl]

    def _embed(self):
        h = self.model.embed_tokens(self.tok)                            # [1,1,D]
        cos, sin = self.model.rotary_emb(h, self.pos_ids)                # [1,1,hd] each
        return h, cos, sin

    def _pre(self, i: int, h, cos, sin):
        """Layer i up to its attention; K/V written at ``pos`` of the cache."""
        return _layer_pre(self.layers[i], h, cos, sin, self.pos, self.k_cache[i], self.v_cache[i], self.rope,
                          self.head_dim, self.qk_norm)

    def _attend(self, fn, i: int, q, length: int, contiguous: bool | None = None):
        """Exact mode: transformers' attention call of the plain path (mask None: one query sees every cached
        position)."""
        attn = self.layers[i].self_attn
        k, v = self.k_cache[i][:, :, :length], self.v_cache[i][:, :, :length]
        if self.contiguous_kv if contiguous is None else contiguous:
            k, v = k.contiguous(), v.contiguous()                        # the dynamic cache's exact layout
        out, _ = fn(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling,
                    sliding_window=getattr(attn, "sliding_window", None), position_ids=self.pos_ids)
        return out                                                       # [1,1,H,hd]

    def _length_mask(self):
        """Static mode: ``[1,1,1,max_len]`` fp32, 0 up to the current position, ``-inf`` after it."""
        return torch.where(self._positions <= self.pos_ids.view(1, 1, 1, 1), self._zero, self._ninf)

    def _calibrate(self):
        """Exact mode: does the attention kernel give the same bits on a strided view of the cache as on a
        contiguous copy (the plain path's layout)? If not, copy K/V before each call (a little slower, still exact)."""
        self.tok.zero_()
        self.pos_ids.fill_(self.max_len - 1)
        self.k_cache[0].normal_()
        self.v_cache[0].normal_()
        h, cos, sin = self._embed()
        q = self._pre(0, h, cos, sin)
        fn = self._attention()
        length = min(self.max_len, 3 * BUCKET // 2)
        strided = self._attend(fn, 0, q, length, contiguous=False)
        packed = self._attend(fn, 0, q, length, contiguous=True)
        self.contiguous_kv = not torch.equal(strided, packed)
        self.k_cache[0].zero_()
        self.v_cache[0].zero_()

    def _post(self, i: int, h, a):
        return _layer_post(self.layers[i], h, a)

    def _head(self, h):
        return self.lm_head(self.model.norm(h))                          # [1,1,V]

    def _eager_step(self, length: int):
        fn = self._attention()
        h, cos, sin = self._embed()
        for i in range(len(self.layers)):
            q = self._pre(i, h, cos, sin)
            h = self._post(i, h, self._attend(fn, i, q, length))
        return self._head(h)

    def _static_step(self):
        h, cos, sin = self._embed()
        mask = self._length_mask()
        layer_fn = self._layer_fn
        for i, layer in enumerate(self.layers):
            h = layer_fn(layer, h, cos, sin, mask, self.pos, self.k_cache[i], self.v_cache[i], self.rope,
                         self.head_dim, self.qk_norm)
        return self._head(h)

    def _compile(self, backend: str) -> None:
        """Static mode: ``torch.compile`` the decoder layer (fuses norms, rotary, the masked softmax, SiLU*mul and
        the residual adds: ~60 kernels per layer become ~15). Compiled here, before any capture, on a copy of the
        state; a failure leaves the plain layer function (same results, more kernels)."""
        import time as _time
        t0 = _time.perf_counter()
        fn = _compiled_static_layer(backend)
        try:
            with torch.no_grad():
                self.pos_ids.fill_(self.max_len - 1)
                mask = self._length_mask()
                h, cos, sin = self._embed()
                for _ in range(2):
                    fn(self.layers[0], h, cos, sin, mask, self.pos, self.k_cache[0], self.v_cache[0], self.rope,
                       self.head_dim, self.qk_norm)
        except Exception as e:  # noqa: BLE001 - compilation is an optimisation only
            self.compiled = False
            self.compile_info.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            warnings.warn(f"[llava_lib] 解码层编译失败，改用未编译的层（结果相同，速度较慢）：{e}")
            return
        self._layer_fn = fn
        self.compile_info.update(ok=True, backend=backend, seconds=round(_time.perf_counter() - t0, 2))

    def _clear(self, start: int) -> None:
        """Zero the cache from ``start`` on: what a masked position holds never matters, but 0 * NaN would."""
        if start < self.max_len:
            for k, v in zip(self.k_cache, self.v_cache):
                k[:, :, start:].zero_()
                v[:, :, start:].zero_()

    # -- CUDA graphs -------------------------------------------------------------------------------------------
    def _warm_side_stream(self, fn, times: int = 2):
        """Run ``fn`` eagerly on a side stream (cuBLAS handles and workspaces, lazy inits), as capture needs."""
        dev = self.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(times):
                out = fn()
            out = out.clone()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        return side, out

    def _capture_static(self):
        dev = self.device
        self.tok.zero_()
        self.pos_ids.fill_(self.max_len - 1)            # the last slot: every position is visible, all of it real
        side, ref = self._warm_side_stream(self._static_step)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            g.capture_begin(capture_error_mode="thread_local")
            try:
                self._logits = self._static_step()
            finally:
                g.capture_end()
        torch.cuda.synchronize(dev)
        self.graphs = [g]
        got = self._graph_step(self.max_len)
        self._check_graph(got, ref)

    def _capture(self):
        dev = self.device
        n = len(self.layers)
        self.tok.zero_()
        self.pos_ids.fill_(self.max_len - 1)            # a slot that a real step always rewrites before reading
        side, ref = self._warm_side_stream(lambda: self._eager_step(self.max_len))
        with torch.cuda.stream(side):
            a_like = self._attend(self._attention(), 0, self._pre(0, *self._embed()), self.max_len)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        self.a_in = torch.zeros_like(a_like)
        pool = torch.cuda.graph_pool_handle()
        graphs, hs, qs = [], [], []
        with torch.cuda.stream(side):
            for seg in range(n + 1):
                g = torch.cuda.CUDAGraph()
                g.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    if seg == 0:
                        h, self._cos, self._sin = self._embed()
                    else:
                        h = self._post(seg - 1, hs[-1], self.a_in)
                    if seg < n:
                        qs.append(self._pre(seg, h, self._cos, self._sin))
                        hs.append(h)
                    else:
                        self._logits = self._head(h)
                finally:
                    g.capture_end()
                graphs.append(g)
        torch.cuda.synchronize(dev)
        self.graphs, self._hs, self._qs = graphs, hs, qs
        got = self._graph_step(self.max_len)
        self._check_graph(got, ref)

    def _check_graph(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        """The replayed graph against the same step run eagerly (same state): same kernels, so the same bits are
        expected. Exact mode insists on them; static mode accepts rounding-level differences (relative 1e-3 fp32,
        2e-2 bf16/fp16 of the largest logit) and falls back to the eager pieces past that."""
        equal = bool(torch.equal(got, ref))
        finite = bool(torch.isfinite(got).all())
        diff = float((got.float() - ref.float()).abs().max()) if finite else float("nan")
        scale = float(ref.float().abs().max()) or 1.0
        tol = (1e-3 if self.dtype == torch.float32 else 2e-2) * scale
        ok = equal or (self.mode == "static" and finite and diff <= tol)
        self.graph_check = {"captured": True, "bit_identical": equal, "max_abs_diff": diff, "ok": ok}
        if not ok:
            self.graphs = None
            warnings.warn("[llava_lib] CUDA graph 的输出与逐段执行不一致，解码改用逐段执行（保证结果正确）。")

    def _graph_step(self, length: int):
        if self.mode == "static":
            self.graphs[0].replay()
            return self._logits
        fn = self._attention()
        self.graphs[0].replay()
        for i in range(len(self.layers)):
            self.a_in.copy_(self._attend(fn, i, self._qs[i], length))
            self.graphs[i + 1].replay()
        return self._logits

    # -- public ----------------------------------------------------------------------------------------------
    @property
    def uses_cuda_graphs(self) -> bool:
        return self.graphs is not None

    def report(self) -> dict:
        return {"mode": self.mode, "cuda_graphs": self.uses_cuda_graphs, "contiguous_kv": self.contiguous_kv,
                "max_len": self.max_len, "dtype": str(self.dtype).replace("torch.", ""),
                "compiled": self.compiled, "compile": self.compile_info, **self.graph_check}

    def load(self, cache, length: int | None = None) -> None:
        """Copy transformers' cache (after a prefill) into the static cache; the rest of the cache is zeroed."""
        n = None
        for i in range(len(self.layers)):
            k, v = _layer_kv(cache, i)
            n = k.shape[-2]
            if n >= self.max_len:
                raise ValueError(f"上下文长度 {n} 超出静态缓存 {self.max_len}")
            self.k_cache[i][:, :, :n].copy_(k)
            self.v_cache[i][:, :, :n].copy_(v)
        self._clear(n)
        self.length = n if length is None else int(length)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token at the next position; returns the next-token logits ``[vocab]`` (a fresh tensor)."""
        p = self.length
        if p >= self.max_len:
            raise ValueError(f"静态缓存已满（{self.max_len} 个位置）")
        self.tok.fill_(int(token))
        self.pos_ids.fill_(p)
        if self.graphs is not None:
            logits = self._graph_step(p + 1)
        elif self.mode == "static":
            logits = self._static_step()
        else:
            logits = self._eager_step(p + 1)
        self.length = p + 1
        return logits[0, -1].clone()


def _layer_kv(cache, i: int):
    """(keys, values) ``[1, kv_heads, n, head_dim]`` of layer i, across transformers' cache generations."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # llm -> {(mode, compiled): decoder}
_DECODERS_LOCK = threading.Lock()
BUCKET = 256


def _device_type(llm) -> str | None:
    try:
        return next(llm.parameters()).device.type
    except (AttributeError, StopIteration, TypeError):  # not an nn.Module (e.g. a scripted stand-in in a test)
        return None


def fast_decode_wanted(llm, fast: bool | None = None) -> bool:
    """``fast`` if given, else ``LLAVA_FAST_DECODE`` (1/0), else: on CUDA yes, on CPU no."""
    if fast is None:
        fast = _env_flag("LLAVA_FAST_DECODE")
    if fast is None:
        fast = _device_type(llm) == "cuda"
    return bool(fast)


def compile_wanted(llm, compile: bool | None = None) -> bool:
    """``compile`` if given, else ``LLAVA_FAST_DECODE_COMPILE`` (1/0), else: on CUDA yes, on CPU no."""
    if compile is None:
        compile = _env_flag("LLAVA_FAST_DECODE_COMPILE")
    if compile is None:
        compile = _device_type(llm) == "cuda"
    return bool(compile)


def acquire_decoder(llm, needed_len: int, fast: bool | None = None, mode: str | None = None,
                    compile: bool | None = None) -> FastDecoder | None:
    """A locked :class:`FastDecoder` for ``llm`` with room for ``needed_len`` positions, or None (plain path).

    The decoder (static cache + graphs) is kept per model, mode and compile choice and reused; it grows in steps of
    256 positions and is rebuilt when the model's dtype or device changed. Release it with
    ``decoder.lock.release()``. None when not wanted, not supported, under autocast, or busy.
    """
    if not fast_decode_wanted(llm, fast) or unsupported_reason(llm) is not None:
        return None
    mode = decode_mode(mode)
    device_type = _device_type(llm)
    if device_type is None or torch.is_autocast_enabled(device_type):
        return None
    limit = int(getattr(llm.config, "max_position_embeddings", 1 << 30))
    if needed_len > limit:
        return None
    key = (mode, compile_wanted(llm, compile) and mode == "static")
    weight = llm.model.embed_tokens.weight
    with _DECODERS_LOCK:
        per_key = _DECODERS.setdefault(llm, {})
        dec = per_key.get(key)
        if dec is not None and dec.lock.locked():
            return None
        if dec is None or dec.max_len <= needed_len or dec.dtype != weight.dtype or dec.device != weight.device:
            per_key.pop(key, None)
            dec = None
            max_len = min(limit, -(-(needed_len + 1) // BUCKET) * BUCKET)
            try:
                dec = FastDecoder(llm, max_len, mode=mode, compile=key[1])
            except Exception as e:  # noqa: BLE001 - the plain path always works
                warnings.warn(f"[llava_lib] 快速解码不可用，改用普通路径：{e}")
                return None
            per_key[key] = dec
        dec.lock.acquire()
        return dec


def cached_decoder(llm, mode: str | None = None, compile: bool | None = None) -> FastDecoder | None:
    """The decoder kept for ``llm`` (for reports: ``uses_cuda_graphs``, ``graph_check``, ``compile_info``)."""
    mode = decode_mode(mode)
    return _DECODERS.get(llm, {}).get((mode, compile_wanted(llm, compile) and mode == "static"))
