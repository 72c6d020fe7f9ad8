"""Stage 2 training step: the original course's recipe vs. this project's step, in one run on one device.

    python benchmarks/stage2_step.py [--json OUT.json] [--batch-sizes 4,8,16]
    python benchmarks/stage2_step.py --mini        # CI-sized towers on a CPU, well under a minute

Random weights at the real shapes (Qwen3-0.6B, Chinese-CLIP ViT-B/16; benchmarks/common.py), the 197-token image
block plus 64-512 text tokens (Stage 2's conversations are longer than Stage 1's captions; max_text_tokens 512).

(a) original — the course's train_stage2.py: towers and projection in fp32 under bf16 autocast, the vision tower's
    ``hidden_states[-1]``, per-sample concatenation of ``[text before | image | text after]``, full-vocabulary
    logits at every position through ``llm(inputs_embeds=..., labels=...)``, gradient checkpointing, clipping 1.0,
    AdamW (lr 2e-5) on the projection and the whole LLM.
(b) project — ``llava_lib.train``'s step for ``stage=2``: ``LlavaStage1.unfreeze_llm`` (LLM in fp32 under bf16
    autocast, frozen vision tower in bf16), ``train_step`` with ``max_grad_norm=1.0``, the lean head loss (logits
    only where a label is), gradient checkpointing as the full profile's Stage 2 default.

Both compute the loss on the same first batch; they must agree to ``--rtol`` (bf16). For each batch size: samples/s,
peak memory (GiB) and the ratio (b)/(a). An out-of-memory batch size is recorded as such and the ladder goes on.
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

from llava_lib.model import LlavaStage1, VisionTower  # noqa: E402
from llava_lib.process import IMAGE_PAD_ID  # noqa: E402
from llava_lib.train import loss_sum, train_step  # noqa: E402


def original_step(vm, llm, proj, autocast):
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm.requires_grad_(True).train()
    params = list(proj.parameters()) + list(llm.parameters())
    opt = torch.optim.AdamW(params, lr=2e-5)
    device = next(llm.parameters()).device

    def loss_of(batch):
        ids = batch["input_ids"].to(device)
        feats = proj(vm(pixel_values=batch["pixel_values"].to(device), output_hidden_states=True).hidden_states[-1])
        emb = llm.get_input_embeddings()
        rows = []
        for b in range(ids.shape[0]):
            pos = (ids[b] == IMAGE_PAD_ID).nonzero().flatten()
            rows.append(torch.cat([emb(ids[b, :int(pos[0])]), feats[b], emb(ids[b, int(pos[-1]) + 1:])]))
        return llm(inputs_embeds=torch.stack(rows), attention_mask=batch["attention_mask"].to(device),
                   labels=batch["labels"].to(device), use_cache=False).loss

    def step(batch):
        with autocast():
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, loss_of


def project_step(vm, llm, device, autocast):
    vm = copy.deepcopy(vm).to(C.frozen_dtype(device))
    model = LlavaStage1(VisionTower(vm), llm)
    model.unfreeze_llm()
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)

    def step(batch):
        return train_step(model, [batch], opt, autocast=autocast, max_grad_norm=1.0)["loss"]

    def loss_of(batch):
        with autocast():
            s, n = loss_sum(model, batch)
        return s / n

    return step, loss_of, model


def timed(step, batches, device, warmup: int) -> dict:
    C.free_memory(device)
    C.reset_peak(device)
    for b in batches[:warmup]:
        step(b)
    C.sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    C.sync(device)
    seconds = time.perf_counter() - t0
    n = sum(b["input_ids"].shape[0] for b in batches[warmup:])
    return {"samples_per_s": n / seconds, "peak_gib": C.peak_gib(device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mini", action="store_true", help="CI-sized towers (CPU-friendly)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-sizes", default="4,8,16")
    p.add_argument("--steps", type=int, default=6, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rtol", type=float, default=0.05)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = C.pick_device(args.device)
    C.limit_cpu_threads(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    lo, hi = (24, 96) if args.mini else (64, 512)
    vm, llm = C.build_towers(args.mini, device)
    n_img = 1 + (vm.config.image_size // vm.config.patch_size) ** 2
    results, ok = {"device": C.device_info(device), "text_tokens": [lo, hi], "rows": []}, True
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        rng = np.random.default_rng(bs)
        pixels = torch.randn(bs, 3, vm.config.image_size, vm.config.image_size)
        batches = [C.make_batch(rng, C.draw_text_lengths(rng, bs, lo, hi), pixels, n_img)
                   for _ in range(args.warmup + args.steps)]
        row = {"batch_size": bs}
        try:
            proj = torch.nn.Linear(vm.config.hidden_size, llm.config.hidden_size).to(device)
            a_step, a_loss = original_step(vm, copy.deepcopy(llm), copy.deepcopy(proj), autocast)
            b_step, b_loss, model = project_step(vm, copy.deepcopy(llm), device, autocast)
            model.projector.load_state_dict(proj.state_dict())
            with torch.no_grad():
                la, lb = float(a_loss(batches[0])), float(b_loss(batches[0]))
            row["loss_original"], row["loss_project"] = la, lb
            if abs(la - lb) > args.rtol * abs(la):
                ok = False
                print(f"[bench] 批量 {bs}：两种做法的损失不一致 {la:.4f} vs {lb:.4f}")
            row["original"] = timed(a_step, batches, device, args.warmup)
            row["project"] = timed(b_step, batches, device, args.warmup)
            row["ratio"] = row["project"]["samples_per_s"] / row["original"]["samples_per_s"]
        except Exception as e:  # noqa: BLE001 - an OOM at one batch size is a result, not the end
            if not C.is_oom(e):
                raise
            row["oom"] = True
        finally:
            C.free_memory(device)
        results["rows"].append(row)
        print(f"[bench] batch {bs}: " + (", ".join(
            f"{k} {row[k]['samples_per_s']:.1f} samples/s, peak {C._fmt(row[k]['peak_gib'], '.2f')} GiB"
            for k in ("original", "project")) + f", ratio {row['ratio']:.2f}x" if "ratio" in row else "out of memory"))
    C.write_json(args.json, results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
