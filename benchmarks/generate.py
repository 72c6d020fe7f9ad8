"""Greedy decoding at batch 1: transformers' ``generate`` (dynamic cache) vs. the project's chat path, one run.

    python benchmarks/generate.py [--json OUT.json] [--new-tokens 128] [--repeats 3]
    python benchmarks/generate.py --mini            # CI-sized, on a CPU in well under a minute

The prompt is the chat prompt with one image (the 197-token image block + "请描述这张图片。"), embedded by
``LlavaStage1.embed`` (vision tower + projection), exactly as ``ChatSession.stream`` does. Exactly ``--new-tokens``
tokens are generated on every path: stop ids are switched off (``eos_token_id=None`` for transformers, an empty
stop set for ``generate_tokens``). Paths:

* ``hf_generate``: ``llm.generate(inputs_embeds=..., do_sample=False)`` with its default dynamic cache;
* ``project_plain``: ``llava_lib.chat.generate_tokens(..., fast=False)`` (transformers' dynamic cache, our loop);
* ``project_fast``: ``generate_tokens(..., fast=True)``: ``accel.FastDecoder`` (static cache, CUDA graphs on a GPU).

The greedy tokens of all paths must be identical, and the fast decoder's logits are compared bit for bit with the
plain path's, step by step, on the same tokens (teacher forcing). The LLM's random weights are drawn with std
``--init-std`` 0.05 instead of Qwen3's 0.02: at 0.02 a random Qwen3-0.6B emits one token over and over, which
would make the identity check vacuous (the speed does not depend on it). Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
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


def project_generate(llm, embeds, n: int, fast: bool) -> dict:
    """The chat path's token loop (``ChatSession.stream`` minus detokenisation); stop set empty."""
    t0 = time.perf_counter()
    t_first, tokens = None, []
    for tok in generate_tokens(llm, embeds, set(), GenerationConfig(max_new_tokens=n), fast=fast):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(tok)
    total = time.perf_counter() - t0
    return _timing(tokens, t0, t_first or t0, total)


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
               same_tokens_every_run=all(r["tokens"] == runs[0]["tokens"] for r in runs))
    return out


@torch.no_grad()
def logits_check(llm, embeds, tokens: list[int]) -> dict:
    """Teacher-forced: the plain path's and the fast decoder's next-token logits on the same tokens, bit for bit."""
    kw = _cache_kwarg(llm)
    out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    plain = []
    for tok in tokens[:-1]:
        out = llm(input_ids=torch.tensor([[tok]], device=embeds.device), use_cache=True, **{kw: cache})
        cache = _cache_of(out)
        plain.append(out.logits[0, -1].clone())
    out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    dec = accel.acquire_decoder(llm, embeds.shape[1] + len(tokens), fast=True)
    if dec is None:
        return {"ran": False, "reason": "no FastDecoder for this model"}
    try:
        dec.load(_cache_of(out))
        fast = [dec.step(tok) for tok in tokens[:-1]]
    finally:
        dec.lock.release()
    equal = [bool(torch.equal(a, b)) for a, b in zip(plain, fast)]
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(plain, fast)), default=0.0)
    return {"ran": True, "steps": len(equal), "bit_identical_steps": sum(equal), "max_abs_diff": diff,
            "first_mismatch": next((i for i, e in enumerate(equal) if not e), None), **dec.report()}


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
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = C.pick_device(args.device)
    C.limit_cpu_threads(device, args.threads)
    n = args.new_tokens
    init_std = args.init_std if args.init_std is not None else (0.3 if args.mini else 0.05)
    reps = args.repeats or (2 if args.mini else 3)
    res: dict = {"benchmark": "generate", "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                 "device": C.device_info(device), "mini": args.mini, "checks": {}, "errors": [],
                 "settings": {"new_tokens": n, "repeats": reps, "init_std": init_std, "batch": 1}}
    save = lambda: C.write_json(args.json, res)  # noqa: E731
    print(f"[generate] {res['device'].get('name')} | torch {torch.__version__} | mini={args.mini}", flush=True)

    vm, llm = C.build_towers(args.mini, device, seed=args.seed, init_std=init_std, mini_world=args.mini_world)
    dtype = C.frozen_dtype(device)
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
    print(f"[generate] 提示 {ids.shape[1]} 个词元（含图片块），图片编码+嵌入 {res['models']['embed_s'] * 1e3:.1f} ms", flush=True)

    paths = {}
    # warm-up runs (first call: kernel selection, cuBLAS handles; for the fast path also graph capture)
    t0 = time.perf_counter()
    hf_generate(llm, embeds, min(n, 8))
    res["warmup_hf_s"] = time.perf_counter() - t0
    project_generate(llm, embeds, min(n, 8), fast=False)
    t0 = time.perf_counter()
    cold = project_generate(llm, embeds, n, fast=True)
    res["fast_first_call_s"] = time.perf_counter() - t0
    dec = accel.cached_decoder(llm)
    res["fast_decoder"] = dec.report() if dec else {"cuda_graphs": False, "error": "no decoder was built"}
    save()

    for name, fn in (("hf_generate", lambda: hf_generate(llm, embeds, n)),
                     ("project_plain", lambda: project_generate(llm, embeds, n, fast=False)),
                     ("project_fast", lambda: project_generate(llm, embeds, n, fast=True))):
        try:
            paths[name] = repeat(fn, reps)
        except Exception as e:  # noqa: BLE001
            import traceback
            res["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:400]}")
            print(traceback.format_exc()[-2000:], flush=True)
            continue
        p = paths[name]
        print(f"[generate] {name:<14s} {p['tokens_per_s']:8.1f} 词元/s  首词元 {p['ttft_s'] * 1e3:7.1f} ms  "
              f"解码 {p['decode_tokens_per_s']:8.1f} 词元/s", flush=True)
        res["paths"] = {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in paths.items()}
        save()
    res["fast_setup_s"] = max(0.0, res["fast_first_call_s"] - paths.get("project_fast", {}).get("total_s", 0.0))

    checks = res["checks"]
    ref = paths.get("hf_generate", {}).get("tokens")
    checks["n_tokens_forced"] = bool(ref) and all(len(p["tokens"]) == n for p in paths.values())
    checks["tokens_identical"] = bool(ref) and len(paths) == 3 and all(p["tokens"] == ref for p in paths.values()) \
        and cold["tokens"] == ref
    checks["distinct_tokens"] = len(set(ref or []))
    if not checks["tokens_identical"] and ref:
        for name, p in paths.items():
            first = next((i for i, (a, b) in enumerate(zip(ref, p["tokens"])) if a != b), None)
            checks[f"first_divergence_{name}"] = first
    try:
        checks["logits"] = logits_check(llm, embeds, ref or cold["tokens"])
    except Exception as e:  # noqa: BLE001
        checks["logits"] = {"ran": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    lg = checks["logits"]
    checks_ok = checks["n_tokens_forced"] and checks["tokens_identical"] and lg.get("ran", False) and \
        lg.get("bit_identical_steps") == lg.get("steps")
    res["checks_passed"] = bool(checks_ok)

    base = paths.get("hf_generate", {}).get("tokens_per_s")
    res["ratio_fast_over_hf"] = paths["project_fast"]["tokens_per_s"] / base if base and "project_fast" in paths else None
    res["ratio_plain_over_hf"] = paths["project_plain"]["tokens_per_s"] / base if base and "project_plain" in paths else None
    table = [f"{'path (batch 1, ' + str(n) + ' new tokens)':<44s} {'tok/s':>8s} {'TTFT ms':>8s} {'decode tok/s':>12s} {'x HF':>6s}"]
    labels = {"hf_generate": "transformers generate (dynamic cache)",
              "project_plain": "project chat path, plain (dynamic cache)",
              "project_fast": "project chat path, FastDecoder" + (" (CUDA graphs)" if res["fast_decoder"]["cuda_graphs"] else "")}
    for name, p in paths.items():
        ratio = p["tokens_per_s"] / base if base else float("nan")
        table.append(f"{labels[name]:<44s} {p['tokens_per_s']:>8.1f} {p['ttft_s'] * 1e3:>8.1f} "
                     f"{p['decode_tokens_per_s']:>12.1f} {ratio:>6.2f}")
    table.append(f"tokens identical: {checks['tokens_identical']} ({checks['distinct_tokens']} distinct); fast logits "
                 f"bit-identical steps: {lg.get('bit_identical_steps', '-')}/{lg.get('steps', '-')}; "
                 f"fast setup (capture) {res['fast_setup_s']:.2f} s")
    res["table"] = table
    res["wall_s"] = time.perf_counter() - t_start
    save()
    print("\n".join(table))
    print(f"ratio fast/hf: {C._fmt(res['ratio_fast_over_hf'], '.2f')}  (checks {'passed' if checks_ok else 'FAILED'})")
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
