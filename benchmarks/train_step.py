"""Stage-1 training step: the textbook step vs. the project's own step, in one run on one device.

    python benchmarks/train_step.py [--json OUT.json] [--batch-sizes 16,32,64,128,256,384] [--compile auto]
    python benchmarks/train_step.py --mini          # CI-sized towers on a CPU, well under a minute

Models: random weights at the real shapes (Qwen3-0.6B, Chinese-CLIP ViT-B/16), the real vocabulary and the real
chat-template token ids (benchmarks/common.py); captions of 40-128 text tokens plus the 197-token image block.

(a) textbook — the original course's step: towers in fp32 under bf16 autocast (what the course got: transformers
    4.x loaded fp32 weights and training ran under bf16 autocast), the vision tower's ``hidden_states[-1]``,
    embeddings concatenated per sample ``[text before | projected image | text after]``, full-vocabulary logits at
    every position through ``llm(inputs_embeds=..., labels=...)``, gradient checkpointing on, batch 16, batches in
    random order (no length grouping), AdamW on the projection.
(b) project — exactly the step of ``llava_lib.train.train()``: ``loss_sum`` (``LlavaStage1.forward`` under
    train.py's autocast), ``backward``, AdamW on the projection; frozen towers in bf16 (``loading.default_dtype``),
    length-grouped batches; at each batch size of ``--batch-sizes`` until out of memory.

The ladder between them, each rung one change (same batch size, same batches): L0 train()'s step as it was before
issue 7 (padding mask kept, a KV cache built in the training forward) -> L1 no KV cache -> L2 no redundant mask
(= train() now; also timed on batches in random order, to show what length grouping buys) -> L3 fused head loss
-> L4 regional ``torch.compile`` (``accel.compile_towers``, as ``train.setup`` does on CUDA). Before timing, (a) and every (b) variant compute the loss and
the projection's gradient on the same batch; the losses must agree to ``--rtol`` (bf16). Before a variant is
timed, every batch it times has run once (``--warm-shapes``): cuDNN attention builds a plan per new shape.
Prints samples/s, useful TFLOP/s (common.FLOP_FORMULA), % of a bf16 matmul measured in the same run, peak memory,
and the ratio to (a). Exit status 1 when a loss check fails (the JSON is written first).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (benchmarks/common.py; puts the repo on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llava_lib.model import LlavaStage1, VisionTower, accel  # noqa: E402
from llava_lib.process import IMAGE_PAD_ID  # noqa: E402
from llava_lib.model.llava import lean_causal_lm_loss  # noqa: E402
from llava_lib.train import loss_sum, train_step  # noqa: E402


class Textbook:
    """The course's training step (module docstring, (a))."""

    def __init__(self, vision_model, llm, projector, device, autocast, lr: float = 2e-3):
        self.vm, self.llm, self.proj, self.device, self.autocast = vision_model, llm, projector, device, autocast
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.train()  # as under the Trainer: checkpointing only acts in train mode (Qwen3 has no dropout)
        self.opt = torch.optim.AdamW(projector.parameters(), lr=lr)

    def loss(self, batch) -> torch.Tensor:
        dev = self.device
        ids = batch["input_ids"].to(dev)
        feats = self.vm(pixel_values=batch["pixel_values"].to(dev), output_hidden_states=True).hidden_states[-1]
        feats = self.proj(feats)                                           # [B,197,D]
        emb = self.llm.get_input_embeddings()
        rows = []
        for b in range(ids.shape[0]):
            pos = (ids[b] == IMAGE_PAD_ID).nonzero().flatten()
            first, last = int(pos[0]), int(pos[-1])
            rows.append(torch.cat([emb(ids[b, :first]), feats[b], emb(ids[b, last + 1:])]))
        return self.llm(inputs_embeds=torch.stack(rows), attention_mask=batch["attention_mask"].to(dev),
                        labels=batch["labels"].to(dev), use_cache=False).loss

    def step(self, batch) -> float:
        with self.autocast():
            loss = self.loss(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def configure(model, *, keep_mask: bool = False, fused: bool = False, kv_cache: bool = False) -> None:
    """Switch the project's step between its states. ``kv_cache`` and ``keep_mask`` give the step as it was before
    issue 7 (its forward let the config's ``use_cache=True`` build a KV cache and kept the padding mask)."""
    model.drop_redundant_mask = not keep_mask
    model.head_loss = accel.fused_lean_causal_lm_loss if fused else lean_causal_lm_loss
    body = model.llm.model
    if kv_cache:
        forward = type(body).forward.__get__(body)
        body.forward = lambda *a, **k: forward(*a, **{**k, "use_cache": True})
    else:
        body.__dict__.pop("forward", None)


class Batches:
    """CPU batches as the DataLoader hands them to train(), the same ones for every variant at one batch size.

    ``grouped``: as ``LengthGroupedSampler`` forms them, a mega-batch of 50 batches sorted by length; the timed
    batches are taken at evenly spaced quantiles of it (so a few steps cover short and long captions alike) and the
    warm-up runs the longest one (so peak memory is the worst case). Otherwise: batches in random order.
    """

    def __init__(self, seed: int, lo: int, hi: int, n_image_tokens: int, image_size: int = 224):
        self.seed, self.lo, self.hi, self.n_img, self.image_size = seed, lo, hi, n_image_tokens, image_size
        self.pixels = torch.empty(0)

    def _pixels(self, n: int) -> torch.Tensor:
        if self.pixels.shape[0] < n:
            self.pixels = torch.randn(n, 3, self.image_size, self.image_size,
                                      generator=torch.Generator().manual_seed(n))
        return self.pixels[:n]

    def make(self, batch_size: int, grouped: bool, n_warm: int = 0, n_timed: int = 1) -> list[dict]:
        rng = np.random.default_rng([self.seed, batch_size, int(grouped)])
        mega = 50
        if grouped:
            pool = np.sort(C.draw_text_lengths(rng, batch_size * mega, self.lo, self.hi))[::-1]
            picks = [0] * n_warm + [int(round((i + 0.5) / n_timed * (mega - 1))) for i in range(n_timed)]
            lengths = [pool[k * batch_size:(k + 1) * batch_size] for k in picks]
        else:
            lengths = [C.draw_text_lengths(rng, batch_size, self.lo, self.hi) for _ in range(n_warm + n_timed)]
        return [C.make_batch(rng, ls, self._pixels(batch_size), self.n_img) for ls in lengths]


def measure(step, batches, device, llm_cfg, vis_cfg, peak_tflops: float, warmup: int,
            warm_shapes: bool = True) -> dict:
    """Run ``warmup`` steps, then time the rest; samples/s, useful TFLOP/s, % of peak, peak memory.

    ``warm_shapes``: before timing, also run every timed batch once. On Hopper, SDPA's default backend is cuDNN,
    which builds an execution plan (tens of ms of host time, forward and backward) the first time it sees a
    batch shape; without this, whichever variant first meets a sequence length pays those builds inside its
    timed steps (the 2026-11-26 H200 run: docs/perf_notes.md, Change 2). A training run pays them once per shape.
    """
    C.free_memory(device)
    C.reset_peak(device)
    timed = batches[warmup:]
    warm_batches = batches[:warmup] + (timed if warm_shapes else [])
    t0 = time.perf_counter()
    for b in warm_batches:
        step(b)
    C.sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step(b) for b in timed]
    C.sync(device)
    dt = time.perf_counter() - t0
    samples = sum(b["input_ids"].shape[0] for b in timed)
    flops = sum(C.batch_flops(b, llm_cfg, vis_cfg) for b in timed)
    real = sum(float(b["attention_mask"].sum()) for b in timed)
    padded = sum(b["attention_mask"].numel() for b in timed)
    tflops = flops / dt / 1e12
    return {"batch_size": timed[0]["input_ids"].shape[0], "samples_per_s": samples / dt, "step_s": dt / len(timed),
            "tflops": tflops, "pct_peak": 100.0 * tflops / peak_tflops, "peak_gib": C.peak_gib(device),
            "warmup_s": warm, "warmup_steps": len(warm_batches), "padding_frac": 1.0 - real / padded,
            "loss": float(np.mean(losses)), "steps_timed": len(timed)}


def loss_and_grad(fn, params) -> tuple[float, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    loss = fn()
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in params]
    for p in params:
        p.grad = None
    return float(loss.detach()), grads


def grad_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.flatten() for t in a])
    y = torch.cat([t.flatten() for t in b])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Stage 1 训练步：教材写法 vs 本项目 train() 的写法（同一设备、同一次运行）")
    ap.add_argument("--device", default=None, help="cuda / cpu（默认：有 GPU 用 cuda）")
    ap.add_argument("--mini", action="store_true", help="CI 尺寸（极小随机模型、64 像素图片），CPU 上一分钟内跑完")
    ap.add_argument("--mini-world", action="store_true", help="与 --mini 合用：改用已构建的迷你世界模型（224 像素，较慢）")
    ap.add_argument("--threads", type=int, default=None, help="CPU 线程数（CPU 运行时默认 1）")
    ap.add_argument("--json", default=None, help="把全部结果写到这个 JSON 文件")
    ap.add_argument("--batch-sizes", default=None, help="本项目步骤要扫描的批大小（逗号分隔）")
    ap.add_argument("--textbook-batch", type=int, default=None, help="教材写法的批大小（默认 16）")
    ap.add_argument("--ladder-batch", type=int, default=None, help="逐项改动对比（ladder）所用的批大小")
    ap.add_argument("--steps", type=int, default=None, help="每个配置计时的步数")
    ap.add_argument("--warmup", type=int, default=None, help="每个配置预热的步数")
    ap.add_argument("--warm-shapes", choices=("on", "off"), default="on",
                    help="计时前把每个计时批次先跑一遍（cuDNN 注意力按形状建计划，见 measure()）")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="L4：torch.compile（auto=仅 CUDA）")
    ap.add_argument("--rtol", type=float, default=2e-2, help="损失一致性检查的相对容差（bf16）")
    ap.add_argument("--budget-s", type=float, default=None, help="时间预算（秒）；超出后跳过剩余的扫描")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = C.pick_device(args.device)
    C.limit_cpu_threads(device, args.threads)
    mini = args.mini
    sizes = [int(s) for s in (args.batch_sizes or ("4,8" if mini else "16,32,64,128,256,384")).split(",")]
    tb_batch = args.textbook_batch or (4 if mini else 16)
    ladder_b = args.ladder_batch or (4 if mini else 64)
    steps = args.steps or (2 if mini else 5)
    warmup = args.warmup if args.warmup is not None else (1 if mini else 2)
    budget = args.budget_s or (45.0 if mini else 300.0)
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    res: dict = {"benchmark": "train_step", "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                 "device": C.device_info(device), "mini": mini, "flop_formula": C.FLOP_FORMULA,
                 "settings": {"batch_sizes": sizes, "textbook_batch": tb_batch, "ladder_batch": ladder_b,
                              "steps": steps, "warmup": warmup, "warm_shapes": args.warm_shapes == "on",
                              "compile": compile_on, "rtol": args.rtol,
                              "seed": args.seed},
                 "checks": {}, "errors": [], "skipped": []}
    save = lambda: C.write_json(args.json, res)  # noqa: E731
    print(f"[train_step] {res['device'].get('name')} | torch {torch.__version__} | mini={mini}", flush=True)

    # -- the real tokenizer (CPU side only): the written-out chat ids must be the template's
    if mini:
        try:
            res["checks"]["prompt_ids"] = C.check_prompt_ids(C.load_tokenizer_for_mini())
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"tokenizer check: {type(e).__name__}: {e}")

    # -- towers: one set of random weights; fp32 for the textbook, the frozen dtype for the project
    t0 = time.perf_counter()
    vm32, llm32 = C.build_towers(mini, device, seed=args.seed, mini_world=args.mini_world)
    dtype = C.frozen_dtype(device)
    llm = copy.deepcopy(llm32).to(dtype)
    vm = copy.deepcopy(vm32).to(dtype)
    torch.manual_seed(args.seed)
    model = LlavaStage1(VisionTower(vm), llm)
    llm_cfg, vis_cfg = llm.config, vm.config
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    res["models"] = {"source": getattr(llm32, "source", "?"), "frozen_dtype": str(dtype).replace("torch.", ""),
                     "textbook_dtype": "float32 weights, bf16 autocast" if device.type == "cuda" else "float32",
                     "attention": llm.config._attn_implementation, "llm_matmul_params": C.llm_matmul_params(llm_cfg),
                     "vision_matmul_params": C.vision_matmul_params(vis_cfg), "build_s": time.perf_counter() - t0}
    n_img = model.num_image_tokens
    tb = Textbook(vm32, llm32, copy.deepcopy(model.projector), device, autocast)
    optimizer = torch.optim.AdamW(list(model.projector.parameters()), lr=2e-3, weight_decay=0.0)
    def step(batch) -> float:  # exactly train()'s step (grad_accum=1, one process)
        return train_step(model, [batch], optimizer, autocast=autocast)["loss"]
    model.train()

    peak = C.peak_matmul_tflops(device)
    res["peak_matmul"] = peak
    print(f"[train_step] 实测矩阵乘峰值：{peak['tflops']:.2f} TFLOP/s ({peak['dtype']}, n={peak['n']})", flush=True)
    save()

    lo, hi = C.MINI_TEXT_TOKENS if mini else C.REAL_TEXT_TOKENS
    res["settings"]["text_tokens"] = [lo, hi]
    data = Batches(args.seed + 1, lo, hi, n_img, vis_cfg.image_size)
    check_batch = data.make(tb_batch, grouped=False)[0]

    def tb_loss():
        with autocast():
            return tb.loss(check_batch)

    def proj_loss():
        total, n = loss_sum(model, check_batch, autocast)
        return total / n

    loss_a, grad_a = loss_and_grad(tb_loss, list(tb.proj.parameters()))
    proj0 = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}  # the weights (a) saw
    checks = res["checks"]
    checks["loss_textbook"] = loss_a

    def check(name: str) -> bool:
        trained = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}
        model.projector.load_state_dict(proj0)  # timing steps in between have moved the projection
        try:
            lb, gb = loss_and_grad(proj_loss, list(model.projector.parameters()))
        except Exception as e:  # noqa: BLE001
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(f"[train_step] 损失一致性 {name} 出错：{checks[name]['error']}", flush=True)
            optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            model.projector.load_state_dict(trained)
        rel = abs(lb - loss_a) / abs(loss_a)
        cos = grad_cosine(grad_a, gb)
        ok = rel <= args.rtol and cos >= 0.95   # the gradient bound is loose: it catches a wrong backward, not bf16
        checks[name] = {"loss": lb, "rel_diff": rel, "grad_cosine": cos, "ok": ok}
        print(f"[train_step] 损失一致性 {name}: 教材 {loss_a:.5f} vs {lb:.5f}（相对差 {rel:.2e}，"
              f"梯度余弦 {checks[name]['grad_cosine']:.4f}）{'通过' if ok else '不通过'}", flush=True)
        return ok

    configure(model, keep_mask=True, kv_cache=True)
    check("L0_train_before")
    configure(model)
    check("L2_train_default")
    configure(model, fused=True)
    check("L3_fused_loss")
    save()

    rows = []  # (label, result) for the table

    def run(label: str, fn, batch_size: int, grouped: bool, key: str, warm: int | None = None) -> dict | None:
        if left() < (5 if mini else 15):
            res["skipped"].append(f"{key} (time budget)")
            return None
        n_warm = warm if warm is not None else warmup
        batches = data.make(batch_size, grouped, n_warm, steps)
        failure = None
        try:
            r = measure(fn, batches, device, llm_cfg, vis_cfg, peak["tflops"], n_warm,
                        warm_shapes=args.warm_shapes == "on")
        except Exception as e:  # noqa: BLE001 - record, free, go on with the next measurement
            import traceback
            failure = (C.is_oom(e), f"{key} batch {batch_size}: {type(e).__name__}: {str(e)[:400]}",
                       traceback.format_exc()[-1500:])
        del batches
        if failure is not None:  # outside the except block, so the traceback's tensors can be freed
            optimizer.zero_grad(set_to_none=True)
            C.free_memory(device)
            oom, msg, tb_text = failure
            if oom:
                res.setdefault("oom", []).append(f"{key} batch {batch_size}")
                print(f"[train_step] {label} 批大小 {batch_size}：显存不足，停止增大批量", flush=True)
                return {"oom": True, "batch_size": batch_size}
            res["errors"].append(msg)
            print(f"[train_step] 出错：{msg}\n{tb_text}", flush=True)
            return {"error": msg, "batch_size": batch_size}
        r["label"] = label
        res.setdefault("results", {})[key] = r
        rows.append((label, r))
        print(f"[train_step] {label:<50s} B={r['batch_size']:<4d} {r['samples_per_s']:8.1f} 样本/s "
              f"{r['tflops']:7.2f} TFLOP/s {r['pct_peak']:5.1f}% 峰值 "
              f"{C._fmt(r['peak_gib'], '.1f'):>6s} GiB  (预热 {r['warmup_s']:.1f}s)", flush=True)
        save()
        return r

    # (a) the textbook step
    a = run("(a) textbook step", tb.step, tb_batch, grouped=False, key="textbook")
    tb = llm32 = vm32 = None  # free the fp32 copies before the big batches
    C.free_memory(device)
    if a is None or "samples_per_s" not in a:
        res["errors"].append("textbook step did not run")

    # the ladder, one change per rung, at one batch size
    configure(model, keep_mask=True, kv_cache=True)
    run("L0 train() step before issue 7", step, ladder_b, grouped=True, key="L0")
    configure(model, keep_mask=True)
    run("L1 + no KV cache in the training forward", step, ladder_b, grouped=True, key="L1")
    configure(model)
    run("L2 + no redundant mask (= train() now)", step, ladder_b, grouped=True, key="L2")
    run("L2 with batches in random order", step, ladder_b, grouped=False, key="L2_random_order")
    configure(model, fused=True)
    run("L3 + fused head loss", step, ladder_b, grouped=True, key="L3")

    def sweep(label: str, key: str, reuse: dict | None) -> list[dict]:
        out = []
        for bs in sizes:
            if reuse is not None and reuse.get("batch_size") == bs and not reuse.get("oom"):
                out.append(reuse)
                continue
            r = run(f"{label}", step, bs, grouped=True, key=f"{key}_B{bs}")
            if r is None or r.get("oom") or r.get("error"):
                break
            out.append(r)
        return out

    # L4: regional torch.compile on top of L3
    configure(model, fused=True)
    compiled = False
    if compile_on and left() > (60 if mini else 150):
        try:
            accel.compile_towers(model)
            r = run("L4 + torch.compile (regional)", step, ladder_b, grouped=True, key="L4")
            if r is not None and "samples_per_s" in r:
                r["compile_s"] = max(0.0, r["warmup_s"] - r["warmup_steps"] * r["step_s"])
                compiled = check("L4_compiled")
            res["compile"] = {"ok": compiled}
        except Exception as e:  # noqa: BLE001 - a compile failure leaves the eager numbers standing
            msg = f"torch.compile: {type(e).__name__}: {str(e)[:500]}"
            res["errors"].append(msg)
            res["compile"] = {"ok": False, "error": msg}
            print(f"[train_step] {msg}", flush=True)
            optimizer.zero_grad(set_to_none=True)
            C.free_memory(device)
        if not compiled:
            accel.uncompile_towers(model)
    else:
        res["skipped"].append("L4 torch.compile (" + ("off" if not compile_on else "time budget") + ")")
    fast_label = "(b+) train() step + accel" + (" (compiled)" if compiled else " (fused loss, eager)")
    fast_sweep = sweep(fast_label, "train_accel", res.get("results", {}).get("L4" if compiled else "L3"))

    # train() as it is now (eager), after the compiled runs so that a slow compile cannot crowd out the headline
    if getattr(model, "compiled_towers", False):
        accel.uncompile_towers(model)
    configure(model)
    default_sweep = sweep("(b) train() step now", "train_now", res.get("results", {}).get("L2"))

    # headline and table
    best = lambda rs: max((r for r in rs if "samples_per_s" in r), key=lambda r: r["samples_per_s"], default=None)  # noqa: E731
    b_now, b_fast = best(default_sweep), best(fast_sweep)
    base = (a or {}).get("samples_per_s")
    res["best"] = {"train_now": b_now, "train_accel": b_fast}
    res["ratio_b_over_a"] = (b_fast or {}).get("samples_per_s", float("nan")) / base if base else None
    res["ratio_train_now_over_a"] = (b_now or {}).get("samples_per_s", float("nan")) / base if base else None
    loss_checks = [v for k, v in checks.items() if isinstance(v, dict) and "ok" in v]
    res["checks_passed"] = bool(loss_checks) and all(v["ok"] for v in loss_checks) and \
        all(checks.get("prompt_ids", {"ok": True}).values())
    table = [f"{'variant':<50s} {'B':>4s} {'samples/s':>10s} {'TFLOP/s':>8s} {'%peak':>6s} {'GiB':>6s} {'x (a)':>6s}"]
    for label, r in rows:
        ratio = r["samples_per_s"] / base if base else float("nan")
        table.append(f"{label:<50s} {r['batch_size']:>4d} {r['samples_per_s']:>10.1f} {r['tflops']:>8.2f} "
                     f"{r['pct_peak']:>6.1f} {C._fmt(r['peak_gib']):>6s} {ratio:>6.2f}")
    table.append(f"peak {peak['dtype']} matmul {peak['tflops']:.2f} TFLOP/s; loss (a) {loss_a:.4f}; "
                 f"best train() now: B={C._fmt((b_now or {}).get('batch_size'), 'd')} "
                 f"ratio {C._fmt(res['ratio_train_now_over_a'], '.2f')}; best with accel: "
                 f"B={C._fmt((b_fast or {}).get('batch_size'), 'd')} ratio b/a {C._fmt(res['ratio_b_over_a'], '.2f')}")
    res["table"] = table
    res["wall_s"] = time.perf_counter() - t_start
    save()
    print("\n".join(table))
    print(f"ratio b/a: {C._fmt(res['ratio_b_over_a'], '.2f')}  (loss checks {'passed' if res['checks_passed'] else 'FAILED'})")
    return 0 if res["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
