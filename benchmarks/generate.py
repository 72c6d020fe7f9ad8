"""Greedy decoding at batch 1, three paths in one run, each against transformers' default ``generate``.

    python benchmarks/generate.py [--json OUT.json] [--new-tokens 128] [--repeats 3]
    python benchmarks/generate.py --mini            # CI-sized, on a CPU in well under a minute

The prompt is the chat prompt with one image (the image block + "请描述这张图片。"), embedded by
``LlavaStage1.embed`` (vision tower + projection). Every path decodes exactly ``--new-tokens`` tokens: the LLM's
``generation_config.eos_token_id`` is switched off for the run. Paths:

* ``hf_dynamic`` (a): ``llm.generate(inputs_embeds=..., do_sample=False)`` with its default dynamic KV cache;
* ``hf_static`` (b): the same with ``cache_implementation="static"``; compiled by ``generate`` itself on CUDA
  (``torch.compile``, mode ``reduce-overhead``: CUDA graphs). On a CPU it runs uncompiled unless ``--compile on``:
  compiling the mini model took 106 s cold, 16 s with inductor's cache warm (shared 2-core Intel Xeon, torch 2.13.0);
* ``chat`` (c): the project's chat path, ``ChatSession.stream`` (``generate`` in a thread, a
  ``TextIteratorStreamer``, the stop criterion), with the image encoded and embedded inside the timed call.

Each path reports tokens/s over the whole call, the time to the first token, tokens/s after it, its ratio to (a)
and whether its tokens are (a)'s (random weights in bf16: the top two logits are often closer than a rounding
step, so another kernel order may part the sequences; in fp32 they agree). The LLM's random weights are drawn with
std ``--init-std`` 0.05 instead of Qwen3's 0.02, at which a random Qwen3-0.6B repeats one token (speed does not
depend on it). Exit status 1 when a path failed or decoded another number of tokens.
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
from transformers import CompileConfig  # noqa: E402

from llava_lib.chat import ChatSession  # noqa: E402
from llava_lib.model import LlavaStage1, VisionTower  # noqa: E402

QUESTION = "请描述这张图片。"
LABELS = {"hf_dynamic": "(a) transformers generate, dynamic cache",
          "hf_static": "(b) transformers generate, static cache",
          "chat": "(c) project chat path (ChatSession.stream)"}


class _Clock:
    """A transformers streamer that only notes when new tokens arrived (the prompt, given as embeddings, is empty)."""

    def __init__(self):
        self.t = []

    def put(self, value):
        if value.numel() > 0:
            self.t.append(time.perf_counter())

    def end(self):
        pass


class _IdsAsText:
    """Stand-in detokenizer where no Qwen3 tokenizer is at hand (the GPU machine): ids as text, one per piece."""

    def decode(self, ids, **kwargs) -> str:
        return "".join(f"{i} " for i in ids)


class _Session(ChatSession):
    """The chat path on the benchmark's prompt ids and pixels (no tokenizer needed to build the prompt)."""

    def prompt_ids(self, question: str) -> list[int]:
        return C.prompt_ids(self.model.num_image_tokens)


def _timing(tokens: list[int], t0: float, t_first: float, t_end: float) -> dict:
    n, total, ttft = len(tokens), t_end - t0, t_first - t0
    return {"tokens": tokens, "n": n, "total_s": total, "ttft_s": ttft, "tokens_per_s": n / total,
            "decode_tokens_per_s": (n - 1) / max(total - ttft, 1e-9) if n > 1 else float("nan")}


def hf_generate(llm, embeds, n: int, device, **kwargs) -> dict:
    clock = _Clock()
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    C.sync(device)
    t0 = time.perf_counter()
    out = llm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=n,
                       streamer=clock, **kwargs)
    C.sync(device)
    t_end = time.perf_counter()
    return _timing(out[0].tolist(), t0, clock.t[0] if clock.t else t_end, t_end)


def chat_path(session: ChatSession, n: int, device) -> dict:
    llm, seen, clock = session.model.llm, {}, _Clock()
    real = llm.generate

    def keep(*args, **kwargs):  # the ids generate returned (to compare with (a)) and when the first token came
        put = kwargs["streamer"].put
        kwargs["streamer"].put = lambda value: (clock.put(value), put(value))
        seen["out"] = real(*args, **kwargs)
        return seen["out"]

    llm.generate = keep
    try:
        session.clear()
        C.sync(device)
        t0 = time.perf_counter()
        for _ in session.stream(QUESTION):
            pass
        C.sync(device)
        t_end = time.perf_counter()
    finally:
        del llm.generate
    return _timing(seen["out"][0].tolist(), t0, clock.t[0] if clock.t else t_end, t_end)


def summarize(runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return dict(runs[-1], total_s=med("total_s"), ttft_s=med("ttft_s"), tokens_per_s=med("tokens_per_s"),
                decode_tokens_per_s=med("decode_tokens_per_s"), runs=len(runs),
                same_tokens_every_run=all(r["tokens"] == runs[0]["tokens"] for r in runs))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="批大小 1 的贪心解码：transformers generate（动态缓存 / 静态缓存+编译）vs 本项目的对话路径")
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
                    help="精度（auto：GPU 上 bf16，CPU 上 fp32）")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="(b) 是否编译（auto：仅 CUDA；CPU 上编译要一分多钟）")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = C.pick_device(args.device)
    C.limit_cpu_threads(device, args.threads)
    n = args.new_tokens
    reps = args.repeats or (2 if args.mini else 3)
    compile_b = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    res = {"device": C.device_info(device), "paths": {}, "errors": [], "skipped": [], "new_tokens": n}
    save = lambda: C.write_json(args.json, res)  # noqa: E731
    say = lambda msg: print(f"[generate] {msg}", flush=True)  # noqa: E731
    say(f"{res['device'].get('name')} | torch {torch.__version__} | mini={args.mini}")

    init_std = args.init_std if args.init_std is not None else (0.3 if args.mini else 0.05)
    vm, llm = C.build_towers(args.mini, device, seed=args.seed, init_std=init_std, mini_world=args.mini_world)
    dtype = C.frozen_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    llm.to(dtype)
    vm.to(dtype)
    llm.generation_config.update(eos_token_id=None, pad_token_id=C.PAD_ID)   # exactly n tokens on every path
    torch.manual_seed(args.seed)
    model = LlavaStage1(VisionTower(vm), llm)
    ids = torch.tensor([C.prompt_ids(model.num_image_tokens)], device=device)
    size = vm.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
    try:
        tokenizer, tok_name = C.load_tokenizer_for_mini(), "Qwen3"
    except Exception as e:  # noqa: BLE001 - no tokenizer on the GPU machine
        tokenizer, tok_name = _IdsAsText(), f"ids as text ({type(e).__name__})"
    session = _Session(model, tokenizer, generation={"do_sample": False, "max_new_tokens": n})
    session._pixels = pixels
    static_kw = {"cache_implementation": "static"}
    if compile_b:
        cc = CompileConfig()
        cc._compile_all_devices = device.type != "cuda"   # generate compiles on its own only on accelerators
        static_kw["compile_config"] = cc
    else:
        static_kw["disable_compile"] = True
        res["skipped"].append("(b) compile: " + ("--compile off" if args.compile == "off" else
                                                 "CPU (a cold compile of the mini model took 106 s; --compile on)"))
    res["models"] = {"source": getattr(llm, "source", "?"), "dtype": str(dtype).replace("torch.", ""),
                     "attention": llm.config._attn_implementation, "prompt_tokens": ids.shape[1],
                     "detokenizer": tok_name, "hf_static_compiled": compile_b}

    paths = {"hf_dynamic": lambda: hf_generate(llm, embeds, n, device),
             "hf_static": lambda: hf_generate(llm, embeds, n, device, **static_kw),
             "chat": lambda: chat_path(session, n, device)}
    def attempt(name: str):
        try:
            return paths[name]()
        except Exception as e:  # noqa: BLE001 - report, keep the other paths
            import traceback
            print(traceback.format_exc()[-2000:], flush=True)
            res["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:400]}")
            del paths[name]

    res["warmup_s"] = {}
    for name in list(paths):
        t0 = time.perf_counter()
        attempt(name)                                # warm-up (on CUDA with (b): the compilation)
        res["warmup_s"][name] = time.perf_counter() - t0
    runs: dict = {name: [] for name in paths}
    for _ in range(reps):                            # interleaved, so a change of load hits every path alike
        for name in list(paths):
            if (r := attempt(name)) is not None:
                runs[name].append(r)
    for name in paths:
        p = res["paths"][name] = summarize(runs[name])
        say(f"{name:<10s} {p['tokens_per_s']:8.1f} 词元/s  首词元 {p['ttft_s'] * 1e3:7.1f} ms  "
            f"预热 {res['warmup_s'][name]:.1f} s")
    save()

    got = res["paths"]
    ref = got.get("hf_dynamic")
    ref_tokens = ref["tokens"] if ref else None
    for p in got.values():
        p["ratio_over_a"] = p["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        p["same_tokens_as_a"] = p["tokens"] == ref_tokens
        p["first_divergence_from_a"] = first_divergence(ref_tokens, p["tokens"]) if ref else None
    for p in got.values():
        p["distinct_tokens"] = len(set(p.pop("tokens")))
    res["checks_passed"] = not res["errors"] and len(got) == 3 and all(p["n"] == n for p in got.values())
    res["table"] = table(res, n)
    res["wall_s"] = time.perf_counter() - t_start
    save()
    print("\n".join(res["table"]))
    return 0 if res["checks_passed"] else 1


def table(res: dict, n: int) -> list[str]:
    m = res["models"]
    rows = [f"greedy, batch 1, {n} new tokens, {m['dtype']}, {m['prompt_tokens']}-token prompt, {m['source']}",
            f"{'path':<50s} {'tok/s':>8s} {'TTFT ms':>8s} {'dec tok/s':>9s} {'x (a)':>6s} {'same as (a)':>11s}"]
    for name, p in res["paths"].items():
        label = LABELS[name] + (" + compile" if name == "hf_static" and m["hf_static_compiled"] else "")
        rows.append(f"{label:<50s} {p['tokens_per_s']:>8.1f} {p['ttft_s'] * 1e3:>8.1f} "
                    f"{p['decode_tokens_per_s']:>9.1f} {C._fmt(p['ratio_over_a'], '.2f'):>6s} "
                    f"{str(p['same_tokens_as_a']):>11s}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
