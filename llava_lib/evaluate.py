"""Evaluate a run (or its export) on its held-out split: greedy replies generated in batches, then scored.

The same items, prompt and token budget as the trainer's ``*_accuracy_after``; the scores (docs/EVALUATION.md): the
profile's accuracy check, character BLEU-4 and CIDEr (pycocoevalcap) and for captions CLIPScore. The same replies
are also timed one by one through the chat loop, for the speed-up of batching.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

from . import config as cfg_mod
from . import train
from .chat import answer_turns, caption
from .export import find_checkpoint
from .model.checkpoint import RUN_INFO, run_config

MAX_NEW_TOKENS = {1: 48, 2: 32}  # the trainer's caption / answer budgets
DEFAULT_N = {1: 100, 2: 50}      # when the run's config measured none
CLIPSCORE_W = 2.5                # CLIPScore's weight (Hessel et al., 2021)


def load_export(path, device=None):
    """An export back as ``(LlavaStage1, tokenizer)``, sharing its modules (its projector computes the same)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, Qwen3ForCausalLM

    from .model.llava import LlavaStage1
    from .model.vision import VisionTower
    hf = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.device("meta"):  # a shell whose two parts are the export's
        llm = Qwen3ForCausalLM(hf.config.text_config)
    llm.model, llm.lm_head, llm.generation_config = hf.model.language_model, hf.lm_head, hf.generation_config
    model = LlavaStage1(VisionTower(hf.model.vision_tower, hf.config.vision_feature_layer), llm)
    model.projector = hf.model.multi_modal_projector
    return model.to(device or "cpu"), AutoTokenizer.from_pretrained(str(path))


def load(checkpoint, profile: str | None = None, device=None):
    """``(model, tokenizer, TrainConfig of the run)`` for a run folder, a checkpoint or an export."""
    from .model.loading import load_trained
    cfg, path = run_config(checkpoint, profile), Path(checkpoint).expanduser()
    if (path / RUN_INFO).is_file():
        return (*load_export(path, device), cfg)
    return (*load_trained(find_checkpoint(path), cfg.paths, device)[:2], cfg)


def char_scores(pairs) -> dict:
    """Corpus BLEU-4 and CIDEr-D of ``(generated, reference)`` pairs over characters (pycocoevalcap)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        print("[evaluate] 没有安装 pycocoevalcap（pip install pycocoevalcap），跳过 BLEU-4 / CIDEr。", file=sys.stderr)
        return {}
    chars = lambda text: " ".join(ch for ch in text if not ch.isspace())
    res = {i: [chars(g)] for i, (g, _) in enumerate(pairs)}
    gts = {i: [chars(r)] for i, (_, r) in enumerate(pairs)}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def clip_scores(clip_path, images, pairs, device=None) -> dict:
    """Mean CLIPScore of each image with its generated caption, and with its reference (for scale)."""
    from .retrieval import ClipMatcher
    matcher = ClipMatcher.from_pretrained(clip_path, device=device)
    img = matcher.encode_images(images)
    score = lambda texts: float((CLIPSCORE_W * (img * matcher.encode_texts(texts)).sum(-1).clamp(min=0)).mean())
    return {"clipscore": score([g for g, _ in pairs]), "clipscore_reference": score([r for _, r in pairs])}


def evaluate(model, tokenizer, cfg: cfg_mod.TrainConfig, n: int | None = None, batch_size: int = 32,
             sequential_n: int = 20, clipscore: bool = True) -> dict:
    """Generate and score the run's held-out items; the first ``sequential_n`` items again one by one."""
    stage, paths = cfg.stage, cfg.paths
    if stage == 1:
        _, _, ds, idx, _ = train.stage1_data(paths, cfg)
        idx = idx[:n or cfg.caption_eval_n or DEFAULT_N[1]]
        generate, metric = train.generate_captions, cfg.caption_metric
        one_by_one = lambda i: [(caption(model, tokenizer, ds.image(i), max_new_tokens=MAX_NEW_TOKENS[1]), "")]
    else:
        ds, _, _, idx, _ = train.stage2_data(paths, cfg)
        idx = idx[:n or cfg.answer_eval_n or DEFAULT_N[2]]
        generate, metric = train.generate_answers, cfg.answer_metric
        one_by_one = lambda i: answer_turns(model, tokenizer, ds.image(i), ds.conversations[i], MAX_NEW_TOKENS[2])
    generate(model, tokenizer, ds, idx[:1], 2)  # one-time costs out of the timing
    t0 = time.perf_counter()
    pairs = generate(model, tokenizer, ds, idx, MAX_NEW_TOKENS[stage], batch_size)
    speed = {"batched_per_s": len(pairs) / (time.perf_counter() - t0), "batch_size": batch_size}
    generated = [g for g, _ in pairs]
    if sequential_n:
        sub = idx[:sequential_n]
        t0 = time.perf_counter()
        seq = [pair for i in sub for pair in one_by_one(i)]
        speed.update(one_by_one_per_s=len(seq) / (time.perf_counter() - t0), one_by_one_n=len(seq),
                     same_as_one_by_one=sum(a == g for (a, _), g in zip(seq, generated)))
        speed["speedup"] = speed["batched_per_s"] / speed["one_by_one_per_s"]
    name = "caption" if stage == 1 else "answer"
    metrics = {f"{name}_accuracy": train.caption_accuracy(pairs, train.load_hook(metric))} if metric else {}
    metrics |= char_scores(pairs)
    if clipscore and stage == 1 and Path(paths.clip_path).exists():
        metrics |= clip_scores(paths.clip_path, [ds.image(i) for i in idx], pairs, model.device)
    return {"stage": stage, "profile": cfg.profile, "n": len(pairs), "n_sources": len(idx),
            "max_new_tokens": MAX_NEW_TOKENS[stage],
            "metrics": metrics, "speed": speed, "replies": [{"generated": g, "reference": r} for g, r in pairs]}


_NAMES = {"caption_accuracy": "描述准确率", "answer_accuracy": "回答准确率", "bleu4": "BLEU-4（按字）",
          "cider": "CIDEr（按字）", "clipscore": "CLIPScore（生成的描述）", "clipscore_reference": "CLIPScore（参考描述，对照）"}


def format_table(result: dict, n_examples: int = 3) -> str:
    """The metrics, the speed and a few replies next to their references, as short Chinese text."""
    what = (f"{result['n']} 张验证图片的描述" if result["stage"] == 1 else
            f"{result['n_sources']} 段验证对话里的 {result['n']} 个回答")
    lines = [f"Stage {result['stage']}（{result['profile']}）：{what}，贪心解码，最多 "
             f"{result['max_new_tokens']} 个新词元", "| 指标 | 数值 |", "|---|---|"]
    lines += [f"| {_NAMES.get(k, k)} | {v:.4f} |" for k, v in result["metrics"].items()]
    sp = result["speed"]
    lines.append(f"\n批量生成（每批 {sp['batch_size']}）：{sp['batched_per_s']:.1f} 条/秒")
    if "speedup" in sp:
        lines.append(f"逐条对话（chat 路径，{sp['one_by_one_n']} 条）：{sp['one_by_one_per_s']:.1f} 条/秒；批量快 "
                     f"{sp['speedup']:.1f} 倍，结果一致 {sp['same_as_one_by_one']}/{sp['one_by_one_n']}")
    lines += ["\n生成 | 参考"] + [f"{e['generated']} | {e['reference']}" for e in result["replies"][:n_examples]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_lib.evaluate", description="在留出的验证集上评估训练好的运行"
                                "（或 llava_lib.export 的导出目录）：批量贪心生成，计算指标，写出 JSON 和简表。")
    p.add_argument("--checkpoint", required=True, help="训练输出目录、final/、checkpoints/step-N/ 或导出目录")
    p.add_argument("--n", type=int, help="评估多少张图片（Stage 2：多少段对话）；默认与训练时的准确率评估相同")
    p.add_argument("--batch-size", type=int, default=32, help="批量生成的批大小（默认 32）")
    p.add_argument("--sequential-n", type=int, default=20, help="再逐条生成前几条，比较速度（0：不比较；默认 20）")
    p.add_argument("--no-clipscore", action="store_true", help="不计算 CLIPScore")
    p.add_argument("--profile", choices=cfg_mod.PROFILES, help="没有训练配置（config.json）时用哪个配置档")
    p.add_argument("--device", help="cpu / cuda（默认自动选择）")
    p.add_argument("--out", help="结果 JSON 的路径（默认：检查点目录下的 evaluation.json）")
    args = p.parse_args(argv)
    try:
        model, tok, cfg = load(args.checkpoint, args.profile, args.device)
        result = evaluate(model, tok, cfg, args.n, args.batch_size, args.sequential_n, not args.no_clipscore)
    except (FileNotFoundError, cfg_mod.ConfigError, ValueError) as e:
        print(f"错误：{e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint) / "evaluation.json"
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), **result}, ensure_ascii=False, indent=2),
                   encoding="utf-8")
    print(format_table(result) + f"\n\n结果已写入 {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
