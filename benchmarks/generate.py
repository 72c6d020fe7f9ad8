"""Greedy decoding at batch 1: transformers' ``generate`` (dynamic cache) vs. the project's chat path, one run.

    python benchmarks/generate.py [--json OUT.json] [--new-tokens 128] [--repeats 3] [--budget-s 110]
    python benchmarks/generate.py --mini            # CI-sized, on a CPU in well under a minute

The prompt is the chat prompt with one image (the 197-token image block + "请描述这张图片。"), embedded by
``LlavaStage1.embed`` (vision tower + projection), exactly as ``ChatSession.stream`` does. Exactly ``--new-tokens``
tokens are generated on every path: stop ids are switched off (``eos_token_id=None`` for transformers, an empty
stop set for ``generate_tokens``). Paths, timed in this order (the reference first, before any decoder exists):

* ``hf_generate``: ``llm.generate(inputs_embeds=..., do_sample=False)`` with its default dynamic cache;
* ``project_plain``: ``llava_lib.chat.generate_tokens(..., fast=False)`` (transformers' dynamic cache, our loop);
* ``project_fast``: ``generate_tokens(..., fast=True)``: ``accel.FastDecoder`` as the chat path uses it: ``static``
  mode (one CUDA graph per token, attention over the static cache with a length mask), the decoder layer compiled
  on a GPU (``LLAVA_FAST_DECODE_COMPILE``);
* ``project_fast_nocompile`` (diagnostic, GPU only): the same without ``torch.compile`` (what the graph alone buys);
* ``project_exact`` (diagnostic): the decoder's ``exact`` mode (per-layer graphs, transformers' attention on
  exact-length views between them: the first GPU session's design).

Checks (exit status 1 when one fails; the JSON is written either way):

* **fp32 identity** (the acceptance check for "identical tokens"): the same weights and the same prompt embeddings
  in fp32, transformers' ``generate`` vs. the fast path: the greedy tokens must be identical, and varied enough
  (``--min-distinct``) that the check is not vacuous. Where the main run is fp32 already (a CPU), it is the main run.
  Why fp32: with random weights the top two of 151,936 logits are often closer than a bf16 rounding step, so in bf16
  *any* change of kernel (a static cache instead of a dynamic one, another attention backend) flips some argmax and
  the sequences part; in fp32 the differences are ~1e-5 and a flip needs a near-exact tie.
* **bf16 agreement** (main dtype on a GPU): teacher-forced on the reference tokens, step by step, the fast path's
  logits against the plain path's: all finite, greedy token equal at ``--min-agreement`` (75%) of the steps where
  the reference is finite, mean |difference| under ``--max-mean-diff`` (2%) of the largest logit; max |difference|
  and the reference's top-2 margin are reported. (Real shapes on a CPU, 2026-11-26: 90% agreement, mean |diff|
  0.6% of the largest logit; a mask that hides the current token: 59% agreement, 2.5%; a position off by one: 3%
  agreement, 11%.)
* **diagnostics** (reported, not gating): whether the reference repeats itself (its three runs; two teacher-forced
  passes bit for bit), non-finite logits per path, the SDPA backend chosen for the decode shape, the exact mode's
  bit identity to the plain path, and (``--diagnose``) the same with cuDNN attention switched off.

The LLM's random weights are drawn with std ``--init-std`` 0.05 instead of Qwen3's 0.02: at 0.02 a random
Qwen3-0.6B emits one token over and over, which would make the identity check vacuous (speed does not depend on it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (benchmarks/common.py; puts the repo on sys.path)

import torch  # noqa: E402

from llava_lib.chat import GenerationConfig, _cache_kwarg, _cache_of, generate_tokens  # noqa: E402
from llava_lib.model import LlavaStage1, VisionTower, accel  # noqa: E402


class _Clock:
    """A transformers streamer that only notes when each piece of new tokens arrived."""

    def __init__(self):
        self.t = []

    def put(self, value):
        if value is not None and value.numel() > 0:
            self.t.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(llm, embeds, n: int) -> dict:
    """transformers' own greedy ``generate`` with its default (dynamic) cache; stop ids off."""
    saved = llm.generation_config.eos_token_id
    llm.generation_config.eos_token_id = None
    clock = _Clock()
    try:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        t0 = time.perf_counter()
        out = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=C.PAD_ID, streamer=clock,
                           temperature=None, top_p=None, top_k=None)
        total = time.perf_counter() - t0
    finally:
        llm.generation_config.eos_token_id = saved
    tokens = out[0, -n:].tolist() if out.shape[1] >= n else out[0].tolist()
    return _timing(tokens, t0, clock.t[0] if clock.t else t0 + total, total)


@contextlib.contextmanager
def env(**values):
    """Environment variables for the duration (``generate_tokens`` takes the decoder's mode and compile choice from
    ``LLAVA_FAST_DECODE_MODE`` / ``LLAVA_FAST_DECODE_COMPILE``); None leaves a variable as it is."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is not None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# the fast variants: name -> (decoder mode, compile); project_fast is what the chat path uses by default on a GPU
FAST = {"project_fast": ("static", None), "project_fast_nocompile": ("static", False), "project_exact": ("exact", None)}


def _variant_env(name: str):
    mode, compile = FAST[name]
    return env(LLAVA_FAST_DECODE_MODE=mode, LLAVA_FAST_DECODE_COMPILE=None if compile is None else str(int(compile)))


def project_generate(llm, embeds, n: int, fast: bool, variant: str | None = None) -> dict:
    """The chat path's token loop (``ChatSession.stream`` minus detokenisation); stop set empty."""
    with _variant_env(variant) if variant else contextlib.nullcontext():
        t0 = time.perf_counter()
        t_first, tokens = None, []
        for tok in generate_tokens(llm, embeds, set(), GenerationConfig(max_new_tokens=n), fast=fast):
            if t_first is None:
                t_first = time.perf_counter()
            tokens.append(tok)
        total = time.perf_counter() - t0
    return _timing(tokens, t0, t_first or t0, total)


def cached(llm, variant: str):
    mode, compile = FAST[variant]
    with _variant_env(variant):
        return accel.cached_decoder(llm, mode)


def _timing(tokens, t0, t_first, total) -> dict:
    n = len(tokens)
    ttft = t_first - t0
    return {"tokens": tokens, "n": n, "total_s": total, "ttft_s": ttft, "tokens_per_s": n / total,
            "decode_tokens_per_s": (n - 1) / max(total - ttft, 1e-9) if n > 1 else float("nan")}


def repeat(fn, k: int) -> dict:
    runs = [fn() for _ in range(k)]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    out = dict(runs[-1])
    out.update(total_s=med("total_s"), ttft_s=med("ttft_s"), tokens_per_s=med("tokens_per_s"),
               decode_tokens_per_s=med("decode_tokens_per_s"), runs=len(runs),
               same_tokens_every_run=all(r["tokens"] == runs[0]["tokens"] for r in runs),
               first_divergence_between_runs=[first_divergence(runs[0]["tokens"], r["tokens"]) for r in runs[1:]])
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# ----------------------------------------------------------------------------------------- teacher forcing
@torch.no_grad()
def forced_plain(llm, embeds, tokens: list[int]) -> torch.Tensor:
    """The plain path's next-token logits ``[steps, vocab]`` on ``tokens`` (transformers' dynamic cache)."""
    kw = _cache_kwarg(llm)
    out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    rows = []
    for tok in tokens[:-1]:
        out = llm(input_ids=torch.tensor([[tok]], device=embeds.device), use_cache=True, **{kw: cache})
        cache = _cache_of(out)
        rows.append(out.logits[0, -1].clone())
    return torch.stack(rows)


@torch.no_grad()
def forced_fast(llm, embeds, tokens: list[int], variant: str) -> tuple[torch.Tensor | None, dict]:
    """The fast decoder's logits on the same tokens (same prefill as the plain path)."""
    mode, _ = FAST[variant]
    with _variant_env(variant):
        dec = accel.acquire_decoder(llm, embeds.shape[1] + len(tokens), fast=True, mode=mode)
    if dec is None:
        return None, {"ran": False, "reason": "no FastDecoder for this model"}
    try:
        out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        dec.load(_cache_of(out))
        rows = [dec.step(tok) for tok in tokens[:-1]]
    finally:
        dec.lock.release()
    return torch.stack(rows), dec.report()


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Step-by-step comparison of two ``[steps, vocab]`` logit stacks (``ref`` = the plain path)."""
    bit = (_bits(ref) == _bits(other)).all(1)                            # bit for bit (NaN == NaN here)
    a, b = ref.float(), other.float()
    fin_a, fin_b = torch.isfinite(a).all(1), torch.isfinite(b).all(1)
    both = fin_a & fin_b
    diff = (a - b).abs().amax(1)
    agree = a.argmax(1) == b.argmax(1)
    top2 = a.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    steps = a.shape[0]
    first = lambda m: next((i for i, v in enumerate(m.tolist()) if not v), None)  # noqa: E731
    n_fin = int(fin_a.sum())
    return {
        "steps": steps, "bit_identical_steps": int(bit.sum()), "first_bit_mismatch": first(bit),
        "nonfinite_steps_ref": steps - n_fin, "first_nonfinite_ref": first(fin_a),
        "nonfinite_steps_other": steps - int(fin_b.sum()), "first_nonfinite_other": first(fin_b),
        "max_abs_diff": float(diff[both].max()) if bool(both.any()) else None,
        "mean_abs_diff": float((a[both] - b[both]).abs().mean()) if bool(both.any()) else None,
        "logit_scale": float(a[fin_a].abs().amax()) if n_fin else None,
        "argmax_agree_steps": int((agree & fin_a).sum()), "ref_finite_steps": n_fin,
        "argmax_agreement": float((agree & fin_a).sum()) / n_fin if n_fin else 0.0,
        "first_argmax_disagreement": first(agree | ~fin_a),
        "ref_margin_min": float(margin[fin_a].min()) if n_fin else None,
        "ref_margin_median": float(margin[fin_a].median()) if n_fin else None,
        "ref_margins_below_max_diff": int((margin[both] <= diff[both]).sum()) if bool(both.any()) else None,
    }


def sdpa_probe(llm, length: int) -> dict:
    """Which SDPA backend transformers' decode call (1 query, ``length`` keys, GQA, no mask) gets here."""
    info = {}
    try:
        from torch.nn.attention import SDPBackend
        cfg, p = llm.config, next(llm.parameters())
        q = torch.randn(1, cfg.num_attention_heads, 1, cfg.head_dim, device=p.device, dtype=p.dtype)
        k = torch.randn(1, cfg.num_key_value_heads, length, cfg.head_dim, device=p.device, dtype=p.dtype)
        choice = torch._fused_sdp_choice(q, k, k, None, 0.0, False, scale=cfg.head_dim ** -0.5, enable_gqa=True)
        info["decode_backend"] = SDPBackend(choice).name
        if p.device.type == "cuda":
            b = torch.backends.cuda
            info.update(cudnn_sdp=b.cudnn_sdp_enabled(), flash_sdp=b.flash_sdp_enabled(),
                        mem_efficient_sdp=b.mem_efficient_sdp_enabled(), cudnn=torch.backends.cudnn.version())
    except Exception as e:  # noqa: BLE001 - a probe only
        info["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return info


def no_cudnn_attention():
    """SDPA without the cuDNN backend (flash, memory-efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ----------------------------------------------------------------------------------------- main
FP32_RESERVE_S = 30.0   # kept for the fp32 check (the acceptance check) when deciding whether a diagnostic fits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="批大小 1 的贪心解码：transformers generate（动态缓存）vs 本项目的对话路径")
    ap.add_argument("--device", default=None, help="cuda / cpu（默认：有 GPU 用 cuda）")
    ap.add_argument("--mini", action="store_true", help="CI 尺寸（极小随机模型），CPU 上很快跑完")
    ap.add_argument("--mini-world", action="store_true", help="与 --mini 合用：改用已构建的迷你世界模型")
    ap.add_argument("--json", default=None, help="把全部结果写到这个 JSON 文件")
    ap.add_argument("--new-tokens", type=int, default=128, help="每次生成的新词元数（强制生成满）")
    ap.add_argument("--repeats", type=int, default=None, help="每条路径计时的次数（取中位数）")
    ap.add_argument("--init-std", type=float, default=None, help="随机权重的标准差（默认 0.05；--mini 为 0.3；见模块说明）")
    ap.add_argument("--threads", type=int, default=None, help="CPU 线程数（CPU 运行时默认 1）")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="主运行的精度（auto：GPU 上 bf16，CPU 上 fp32）")
    ap.add_argument("--exact", choices=("on", "off"), default="on", help="也测 FastDecoder 的 exact 模式（诊断）")
    ap.add_argument("--diagnose", choices=("auto", "on", "off"), default="auto",
                    help="关掉 cuDNN 注意力再测参照路径（auto = 仅 CUDA）")
    ap.add_argument("--fp32-check", choices=("auto", "on", "off"), default="auto",
                    help="fp32 下比较词元（auto = 主运行不是 fp32 时）")
    ap.add_argument("--min-agreement", type=float, default=0.75, help="bf16：逐步贪心词元一致的最低比例")
    ap.add_argument("--max-mean-diff", type=float, default=0.02,
                    help="bf16：logits 平均绝对差的上限（相对于最大 logit）")
    ap.add_argument("--min-distinct", type=int, default=None, help="fp32 词元检查至少要有多少个不同词元")
    ap.add_argument("--budget-s", type=float, default=None, help="时间预算（秒）：超出后跳过诊断")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = C.pick_device(args.device)
    C.limit_cpu_threads(device, args.threads)
    n = args.new_tokens
    init_std = args.init_std if args.init_std is not None else (0.3 if args.mini else 0.05)
    reps = args.repeats or (2 if args.mini else 3)
    budget = args.budget_s or (60.0 if args.mini else 110.0)
    min_distinct = args.min_distinct if args.min_distinct is not None else max(2, n // 8)
    left = lambda: budget - (time.perf_counter() - t_start)  # noqa: E731
    res: dict = {"benchmark": "generate", "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                 "device": C.device_info(device), "mini": args.mini, "checks": {}, "diagnostics": {},
                 "errors": [], "skipped": [],
                 "settings": {"new_tokens": n, "repeats": reps, "init_std": init_std, "batch": 1,
                              "min_agreement": args.min_agreement, "max_mean_diff": args.max_mean_diff,
                              "min_distinct": min_distinct,
                              "budget_s": budget}}
    save = lambda: C.write_json(args.json, res)  # noqa: E731
    say = lambda msg: print(f"[generate] {msg}", flush=True)  # noqa: E731
    say(f"{res['device'].get('name')} | torch {torch.__version__} | mini={args.mini}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 in the fp32 check (the default, made sure)

    vm, llm = C.build_towers(args.mini, device, seed=args.seed, init_std=init_std, mini_world=args.mini_world)
    dtype = C.frozen_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    llm.to(dtype)
    vm.to(dtype)
    torch.manual_seed(args.seed)
    model = LlavaStage1(VisionTower(vm), llm)
    ids = torch.tensor([C.prompt_ids(model.num_image_tokens)], device=device)
    size = vm.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        model.embed(ids, pixels)  # warm-up
        C.sync(device)
        t0 = time.perf_counter()
        embeds = model.embed(ids, pixels)
        C.sync(device)
    res["models"] = {"source": getattr(llm, "source", "?"), "dtype": str(dtype).replace("torch.", ""),
                     "attention": llm.config._attn_implementation, "prompt_tokens": ids.shape[1],
                     "embed_s": time.perf_counter() - t0}
    diag = res["diagnostics"]
    diag["sdpa"] = sdpa_probe(llm, ids.shape[1] + n // 2)
    say(f"提示 {ids.shape[1]} 个词元（含图片块），图片编码+嵌入 {res['models']['embed_s'] * 1e3:.1f} ms；"
        f"解码形状的 SDPA 后端：{diag['sdpa'].get('decode_backend', diag['sdpa'].get('error'))}")

    paths: dict = {}

    def timed(name: str, fn, k: int) -> None:
        try:
            paths[name] = repeat(fn, k)
        except Exception as e:  # noqa: BLE001
            import traceback
            res["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:400]}")
            print(traceback.format_exc()[-2000:], flush=True)
            return
        p = paths[name]
        say(f"{name:<14s} {p['tokens_per_s']:8.1f} 词元/s  首词元 {p['ttft_s'] * 1e3:7.1f} ms  "
            f"解码 {p['decode_tokens_per_s']:8.1f} 词元/s  各次词元相同 {p['same_tokens_every_run']}")
        res["paths"] = {k_: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k_, v in paths.items()}
        save()

    # 1. the reference and the plain path, before any FastDecoder exists (warm-up: kernel selection, plans)
    t0 = time.perf_counter()
    hf_generate(llm, embeds, min(n, 8))
    res["warmup_hf_s"] = time.perf_counter() - t0
    timed("hf_generate", lambda: hf_generate(llm, embeds, n), reps)
    project_generate(llm, embeds, min(n, 8), fast=False)
    timed("project_plain", lambda: project_generate(llm, embeds, n, fast=False), reps)

    # 2. the fast path (what the chat path uses) and, as diagnostics, the static graphs without compilation and the
    #    exact mode; the first call of each builds its decoder (compile, capture)
    def fast_variant(name: str, k: int, need_s: float) -> None:
        if name != "project_fast" and (args.exact == "off" and name == "project_exact" or left() < need_s):
            res["skipped"].append(f"{name} ({'off' if args.exact == 'off' and name == 'project_exact' else 'time budget'})")
            return
        try:
            t0 = time.perf_counter()
            project_generate(llm, embeds, n, fast=True, variant=name)
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"{name} (first call): {type(e).__name__}: {str(e)[:400]}")
            return
        dec = cached(llm, name)
        res.setdefault("fast_decoder", {})[name] = dec.report() if dec else {"error": "no decoder was built"}
        timed(name, lambda: project_generate(llm, embeds, n, fast=True, variant=name), k)
        if name in paths:
            res.setdefault("fast_setup_s", {})[name] = max(0.0, first - paths[name]["total_s"])

    fast_variant("project_fast", reps, 0)
    if device.type == "cuda":   # on a CPU nothing compiles by default: it would be project_fast again
        fast_variant("project_fast_nocompile", 1, FP32_RESERVE_S + 5)
    fast_variant("project_exact", 1, FP32_RESERVE_S + 15)
    save()

    # 3. tokens across paths, and teacher-forced logits against the plain path
    checks = res["checks"]
    ref = paths.get("hf_generate", {}).get("tokens")
    checks["n_tokens_forced"] = bool(ref) and all(len(p["tokens"]) == n for p in paths.values())
    checks["distinct_tokens"] = len(set(ref or []))
    checks["tokens_identical"] = bool(ref) and all(p["tokens"] == ref for p in paths.values())
    checks["first_divergence"] = {name: first_divergence(ref, p["tokens"]) for name, p in paths.items()} if ref else {}
    forced = {}
    if ref:
        try:
            plain = forced_plain(llm, embeds, ref)
            again = forced_plain(llm, embeds, ref)
            diag["reference_repeats_itself"] = compare(plain, again)
            del again
            for name in FAST:
                if name in paths:
                    logits, _ = forced_fast(llm, embeds, ref, name)
                    if logits is not None:
                        forced[name] = compare(plain, logits)
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"teacher forcing: {type(e).__name__}: {str(e)[:400]}")
    checks["forced"] = forced
    save()

    # 4. diagnostics: the reference without cuDNN attention (does it repeat itself? is the exact mode bit-exact?)
    want_diag = args.diagnose == "on" or (args.diagnose == "auto" and device.type == "cuda")
    if want_diag and ref and left() > FP32_RESERVE_S + 15:
        try:
            with no_cudnn_attention():
                runs = [hf_generate(llm, embeds, n) for _ in range(2)]
                d = {"tokens_per_s": [r["tokens_per_s"] for r in runs],
                     "same_tokens_both_runs": runs[0]["tokens"] == runs[1]["tokens"],
                     "first_divergence_from_default_backend": first_divergence(ref, runs[0]["tokens"]),
                     "distinct_tokens": len(set(runs[0]["tokens"]))}
                p1 = forced_plain(llm, embeds, runs[0]["tokens"])
                d["reference_repeats_itself"] = compare(p1, forced_plain(llm, embeds, runs[0]["tokens"]))
                if "project_exact" in paths:
                    logits, _ = forced_fast(llm, embeds, runs[0]["tokens"], "project_exact")
                    if logits is not None:
                        d["exact_vs_plain"] = compare(p1, logits)
                del p1
            diag["without_cudnn_attention"] = d
        except Exception as e:  # noqa: BLE001
            diag["without_cudnn_attention"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    elif want_diag:
        res["skipped"].append("diagnostics without cuDNN attention (time budget)")
    save()

    # 5. fp32: identical greedy tokens, transformers' dynamic cache vs the fast path (same weights, same embeddings)
    main_fp32 = dtype == torch.float32
    want_fp32 = args.fp32_check == "on" or (args.fp32_check == "auto" and not main_fp32)
    fp32: dict = {}
    if main_fp32 and "project_fast" in paths and ref:
        fp32 = {"from": "main run", "variant": "project_fast", "hf_tokens_distinct": len(set(ref)),
                "tokens_identical": paths["project_fast"]["tokens"] == ref,
                "first_divergence": first_divergence(ref, paths["project_fast"]["tokens"])}
        if "project_fast" in forced:
            fp32["forced"] = forced["project_fast"]
    elif want_fp32 and "project_fast" in paths:
        # the shipped variant (compiled on a GPU); without compilation when the budget cannot pay a second compile
        compiled = bool(res.get("fast_decoder", {}).get("project_fast", {}).get("compiled"))
        variant = "project_fast" if not compiled or left() > 40 else "project_fast_nocompile"
        try:
            llm.float()
            e32 = embeds.float()
            hf32 = hf_generate(llm, e32, n)
            fast32 = project_generate(llm, e32, n, fast=True, variant=variant)
            dec32 = cached(llm, variant)
            fp32 = {"from": "fp32 run", "variant": variant, "hf_tokens_distinct": len(set(hf32["tokens"])),
                    "tokens_identical": fast32["tokens"] == hf32["tokens"],
                    "first_divergence": first_divergence(hf32["tokens"], fast32["tokens"]),
                    "hf_tokens_per_s": hf32["tokens_per_s"], "fast_tokens_per_s": fast32["tokens_per_s"],
                    "fast_decoder": dec32.report() if dec32 is not None else None}
            if left() > 8:
                logits, _ = forced_fast(llm, e32, hf32["tokens"], variant)
                if logits is not None:
                    fp32["forced"] = compare(forced_plain(llm, e32, hf32["tokens"]), logits)
        except Exception as e:  # noqa: BLE001
            fp32 = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            res["errors"].append(f"fp32 check: {fp32['error']}")
    checks["fp32"] = fp32

    # verdict
    fast_forced = forced.get("project_fast", {})
    static_rep = res.get("fast_decoder", {}).get("project_fast", {})
    graph_ok = static_rep.get("ok", True) and (device.type != "cuda" or bool(static_rep.get("cuda_graphs")))
    fp32_ok = bool(fp32.get("tokens_identical")) and fp32.get("hf_tokens_distinct", 0) >= min_distinct
    if main_fp32:
        bf16_ok = True
    else:
        bf16_ok = bool(fast_forced) and fast_forced["nonfinite_steps_other"] == 0 and \
            fast_forced["ref_finite_steps"] > 0 and fast_forced["argmax_agreement"] >= args.min_agreement and \
            fast_forced["mean_abs_diff"] is not None and \
            fast_forced["mean_abs_diff"] <= args.max_mean_diff * fast_forced["logit_scale"]
    checks["fp32_tokens_identical"] = fp32_ok
    checks["bf16_agreement_ok"] = bf16_ok
    checks["fast_graph_ok"] = bool(graph_ok)
    checks_ok = checks["n_tokens_forced"] and fp32_ok and bf16_ok and bool(graph_ok) and "project_fast" in paths
    res["checks_passed"] = bool(checks_ok)

    base = paths.get("hf_generate", {}).get("tokens_per_s")
    for name in ("project_fast", "project_plain", "project_fast_nocompile", "project_exact"):
        key = "ratio_" + name.replace("project_", "") + "_over_hf"
        res[key] = paths[name]["tokens_per_s"] / base if base and name in paths else None
    res["target_ratio"] = 5.0   # issue 7: at least 5x transformers' dynamic cache
    res["target_met"] = bool(res["ratio_fast_over_hf"]) and res["ratio_fast_over_hf"] >= res["target_ratio"]
    res["table"] = table(res, paths, n)
    res["wall_s"] = time.perf_counter() - t_start
    save()
    print("\n".join(res["table"]))
    print(f"ratio fast/hf: {C._fmt(res['ratio_fast_over_hf'], '.2f')}  (checks {'passed' if checks_ok else 'FAILED'})")
    return 0 if checks_ok else 1


def table(res: dict, paths: dict, n: int) -> list[str]:
    labels = {"hf_generate": "transformers generate (dynamic cache)",
              "project_plain": "project chat path, plain (dynamic cache)",
              "project_fast": "project chat path, FastDecoder",
              "project_fast_nocompile": "FastDecoder static, not compiled (diag.)",
              "project_exact": "FastDecoder exact (diagnostic)"}
    base = paths.get("hf_generate", {}).get("tokens_per_s")
    rows = [f"{'path (batch 1, ' + str(n) + ' new tokens)':<52s} {'tok/s':>7s} {'TTFT ms':>8s} {'dec tok/s':>9s} "
            f"{'x HF':>6s} {'same runs':>9s}"]
    for name, p in paths.items():
        label = labels[name]
        rep = res.get("fast_decoder", {}).get(name)
        if rep:
            label += " (" + "+".join([x for x, on in (("compiled", rep.get("compiled")),
                                                       ("graphs", rep.get("cuda_graphs"))) if on] or ["eager"]) + ")"
        ratio = p["tokens_per_s"] / base if base else float("nan")
        rows.append(f"{label:<52s} {p['tokens_per_s']:>7.1f} {p['ttft_s'] * 1e3:>8.1f} "
                    f"{p['decode_tokens_per_s']:>9.1f} {ratio:>6.2f} {str(p['same_tokens_every_run']):>9s}")
    checks = res["checks"]
    fp32, forced = checks.get("fp32", {}), checks.get("forced", {})
    f = forced.get("project_fast", {})
    rows.append(f"fp32 ({fp32.get('from', '-')}, {fp32.get('variant', '-')}): tokens identical HF vs fast: "
                f"{fp32.get('tokens_identical')} ({fp32.get('hf_tokens_distinct', '-')} distinct); max |dlogit| "
                f"{C._fmt((fp32.get('forced') or {}).get('max_abs_diff'), '.2e')}")
    rows.append(f"{res['models']['dtype']} teacher-forced fast vs plain: greedy agreement "
                f"{C._fmt(f.get('argmax_agreement'), '.3f')}, max |dlogit| {C._fmt(f.get('max_abs_diff'), '.3f')} "
                f"mean {C._fmt(f.get('mean_abs_diff'), '.4f')} (logits up to {C._fmt(f.get('logit_scale'), '.1f')}), "
                f"non-finite steps plain/fast {f.get('nonfinite_steps_ref', '-')}/{f.get('nonfinite_steps_other', '-')}")
    e = forced.get("project_exact")
    if e:
        rows.append(f"exact mode vs plain: bit-identical steps {e['bit_identical_steps']}/{e['steps']}, "
                    f"non-finite steps plain/exact {e['nonfinite_steps_ref']}/{e['nonfinite_steps_other']}")
    diag = res.get("diagnostics", {})
    rr = diag.get("reference_repeats_itself")
    if rr:
        rows.append(f"reference repeats itself (two teacher-forced passes): bit-identical steps "
                    f"{rr['bit_identical_steps']}/{rr['steps']}; SDPA decode backend "
                    f"{diag.get('sdpa', {}).get('decode_backend', '-')}")
    nc = diag.get("without_cudnn_attention")
    if nc and "error" not in nc:
        ev = nc.get("exact_vs_plain", {})
        rows.append(f"without cuDNN attention: HF same tokens both runs {nc['same_tokens_both_runs']}, passes "
                    f"bit-identical {nc['reference_repeats_itself']['bit_identical_steps']}/"
                    f"{nc['reference_repeats_itself']['steps']}, exact vs plain bit-identical "
                    f"{ev.get('bit_identical_steps', '-')}/{ev.get('steps', '-')}")
    rows.append(f"ratio fast/hf {C._fmt(res.get('ratio_fast_over_hf'), '.2f')} (target {res.get('target_ratio')}x: "
                f"{'met' if res.get('target_met') else 'missed'}); not compiled "
                f"{C._fmt(res.get('ratio_fast_nocompile_over_hf'), '.2f')}, exact "
                f"{C._fmt(res.get('ratio_exact_over_hf'), '.2f')}")
    rows.append(f"tokens identical across paths ({res['models']['dtype']}): {checks.get('tokens_identical')} "
                f"({checks.get('distinct_tokens')} distinct); setup s: "
                + ", ".join(f"{m} {v:.2f}" for m, v in res.get("fast_setup_s", {}).items()))
    return rows


if __name__ == "__main__":
    sys.exit(main())
