"""What the training notebooks show about the model and the data: parameter tables, a training sample as the LLM
sees it, held-out images, TensorBoard routes, and the LLM words nearest to each projected image patch."""
from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .process import IGNORE_INDEX, IMAGE_PAD, VISION_END, VISION_START


def parameter_counts(model) -> list[tuple[str, int, int]]:
    """``[(part, parameters, trainable), ...]`` for the vision tower, the projection and the LLM (None: empty)."""
    parts = {"视觉塔 Chinese-CLIP ViT": model.vision, "投影层 projector": model.projector, "语言模型 Qwen3": model.llm}
    params = {name: list(m.parameters()) if m is not None else [] for name, m in parts.items()}
    return [(name, sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad))
            for name, ps in params.items()]


def parameter_table(model) -> str:
    """The counts as an aligned text table, with totals and the trainable share."""
    rows = parameter_counts(model)
    total, trainable = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines = [f"{'部分':<24}{'参数量':>14}{'可训练':>14}  状态"]
    lines += [f"{name:<24}{n:>14,}{t:>14,}  {'训练' if t else '冻结'}" for name, n, t in rows]
    lines += [f"{'合计':<24}{total:>14,}{trainable:>14,}", f"可训练参数占全部参数的 {trainable / max(total, 1):.3%}"]
    return "\n".join(lines)


def _fold_image_block(text: str) -> str:
    """``<|vision_start|><|image_pad|>...<|vision_end|>`` -> the same with the pads written as one ``× N``."""
    start = text.find(VISION_START)
    end = text.find(VISION_END, start)
    if start < 0 or end < 0:
        return text
    n = text.count(IMAGE_PAD, start, end)
    return text[:start] + f"{VISION_START}{IMAGE_PAD} × {n}{VISION_END}" + text[end + len(VISION_END):]


def describe_sample(batch: dict, tokenizer, i: int = 0) -> str:
    """Sample ``i`` of a training batch as the LLM sees it: image block folded, the tokens that carry loss
    (labels != -100) between ``⟦`` and ``⟧``, padding left out."""
    mask = batch["attention_mask"][i].bool()
    ids, labels = batch["input_ids"][i][mask].tolist(), batch["labels"][i][mask].tolist()
    vs, ve, pad = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD])
    spans = [(carries, tokenizer.decode([t for t, _ in span], skip_special_tokens=False))
             for carries, span in itertools.groupby(zip(ids, labels), key=lambda t: t[1] != IGNORE_INDEX)]
    text = _fold_image_block("".join(f"⟦{s}⟧" if carries else s for carries, s in spans))
    loss_ids = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    lines = [f"样本 {i}：共 {len(ids)} 个词元（其中图片占位 {ids.count(pad)} 个），计算损失的词元 {len(loss_ids)} 个"]
    if vs in ids and ve in ids:
        a, b = ids.index(vs), ids.index(ve)
        lines.append(f"图片块：第 {a}–{b} 个词元 = {VISION_START}({vs}) + {b - a - 1} × {IMAGE_PAD}({pad}) "
                     f"+ {VISION_END}({ve})；投影后的图片特征写在这 {b - a - 1} 个位置上")
    lines += ["———— LLM 看到的文本（⟦ ⟧ 里的词元计算损失）————", text, "———— 计算损失的词元（逐个）————",
              " | ".join(repr(tokenizer.decode([t], skip_special_tokens=False))[1:-1] for t in loss_ids)]
    return "\n".join(lines)


def eval_images(paths, n: int = 4):
    """``(images, captions)`` of the first ``n`` held-out samples: ``cache_dir/eval``, else the tail of
    ``cache_dir/train`` (the rule ``train`` uses when there is no separate eval split)."""
    from .data import CachedImageDataset
    held_out = (Path(paths.cache_dir) / "eval").exists()
    ds = CachedImageDataset(Path(paths.cache_dir) / ("eval" if held_out else "train"), transform=None)
    idx = range(min(n, len(ds))) if held_out else range(max(0, len(ds) - n), len(ds))
    return [ds.image(i) for i in idx], [ds.captions[i] for i in idx]


def notebook_stage1_dir(paths) -> Path:
    """Where ``04_stage1_training`` writes its run (``final/`` holds the projection) and ``05_llava_chat`` reads it."""
    return Path(paths.checkpoints_dir) / f"stage1-{paths.profile}-notebook"


def tensorboard_routes(logdir, port: int = 6006, environ=None, has_server_proxy: bool | None = None) -> str:
    """How to see TensorBoard from here. On a remote kernel ``%tensorboard`` shows a blank frame (it points at
    ``port`` of the *browser's* machine), so name the routes that work there."""
    import importlib.util
    env = os.environ if environ is None else environ
    if has_server_proxy is None:
        has_server_proxy = importlib.util.find_spec("jupyter_server_proxy") is not None
    remote = any(env.get(k) for k in ("SSH_CONNECTION", "SSH_CLIENT", "JUPYTERHUB_API_URL", "KUBERNETES_SERVICE_HOST"))
    lines = [f"TensorBoard 日志目录：{logdir}",
             "这个内核运行在远程机器上：%tensorboard 在这里会显示空白框（它指向你自己电脑的端口）。可用的办法：" if remote
             else "浏览器和内核在同一台机器上：下面的 %tensorboard 单元格会在笔记本里直接显示面板。"]
    proxy = "已安装" if has_server_proxy else "未安装，可运行 pip install jupyter-server-proxy 后重启 JupyterLab"
    lines += [f"  1. jupyter-server-proxy（{proxy}）：在终端运行 tensorboard --logdir {logdir} --port {port}，"
              f"再在浏览器里打开 JupyterLab 地址后面加 /proxy/{port}/ 的网址；",
              f"  2. SSH 端口转发：在你自己的电脑上运行 ssh -L {port}:localhost:{port} 用户名@服务器，"
              f"服务器上运行 tensorboard --logdir {logdir} --port {port}，然后打开 http://localhost:{port}；",
              "  3. 不需要任何设置：上面训练时实时更新的 matplotlib 曲线，以及 read_scalars 读回的数据，在哪里都能看。"]
    return "\n".join(lines)


# The published configurations of the real towers (Qwen/Qwen3-0.6B's config.json; Chinese-CLIP ViT-B/16's vision side).
REAL_QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                       eos_token_id=151645, pad_token_id=151643)
REAL_CLIP_VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def real_size_model():
    """The real run's model with no weights (PyTorch's ``meta`` device): its shapes and parameter counts, no download."""
    import torch
    from transformers import ChineseCLIPVisionConfig, ChineseCLIPVisionModel, Qwen3Config, Qwen3ForCausalLM

    from .model import LlavaStage1, VisionTower
    with torch.device("meta"):
        vision = VisionTower(ChineseCLIPVisionModel(ChineseCLIPVisionConfig(**REAL_CLIP_VIT_B16)))
        return LlavaStage1(vision, Qwen3ForCausalLM(Qwen3Config(**REAL_QWEN3_0_6B)))


# ----------------------------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class PatchWords:
    """Per patch of one image (row-major, CLS left out), the ``k`` LLM tokens nearest to its projected feature."""
    ids: list[list[int]]        # [patches][k] token ids, nearest first
    tokens: list[list[str]]     # [patches][k] the same, decoded
    scores: list[list[float]]   # [patches][k] cosine similarities
    n_candidates: int           # how many embedding rows were searched


def nearest_words(model, tokenizer, image, k: int = 5) -> PatchWords:
    """What "aligned to the embedding space" looks like: each patch's projected feature (feature i+1 of the 197 is
    patch i) against every live row of the LLM's *input* embedding table, by cosine. ``image``: a PIL image or
    ``[3, H, W]`` pixels after ``process.clip_transform``."""
    import torch
    import torch.nn.functional as F

    from .process import clip_transform
    pixels = image if isinstance(image, torch.Tensor) else clip_transform(image)
    with torch.no_grad():
        proj = model.project_images(pixels.unsqueeze(0))[0, 1:].float()        # [196, D_llm]
        emb = model.llm.get_input_embeddings().weight
        # The mini Qwen3 leaves the rows its world never uses at exactly zero (no cosine); a real LLM has none.
        rows = torch.nonzero(emb.abs().amax(dim=1) > 0).squeeze(1)
        table = F.normalize(emb[rows].float(), dim=-1)                         # [V_live, D_llm]
        sims = F.normalize(proj.to(table.device), dim=-1) @ table.T            # [196, V_live]
        scores, idx = sims.topk(min(k, len(rows)), dim=-1)
    ids = rows[idx].tolist()
    tokens = [[tokenizer.decode([t], skip_special_tokens=False) for t in row] for row in ids]
    return PatchWords(ids, tokens, scores.tolist(), len(rows))


def _hits(pw: PatchWords, patches, token_ids, k: int | None) -> int:
    wanted = {int(t) for t in token_ids}
    return sum(bool(wanted & set(pw.ids[int(p)][:k])) for p in patches)


def word_share(pw: PatchWords, patches, token_ids, k: int | None = None) -> float:
    """The share of ``patches`` whose ``k`` nearest tokens include at least one of ``token_ids``."""
    patches = list(patches)
    return _hits(pw, patches, token_ids, k) / len(patches) if patches else 0.0


def alignment_report(pw: PatchWords, regions, k: int | None = None, most: float = 0.5) -> str:
    """Region by region, ✓ when an expected word is among the ``k`` nearest on at least ``most`` of its patches.
    ``regions``: ``[(name, patches, {kind: token_ids}), ...]`` (``mini.lm_train.image_word_regions``)."""
    lines = []
    for name, patches, words in regions:
        shares = {kind: word_share(pw, patches, ids, k) for kind, ids in words.items()}
        lines.append(f"{name}（{len(patches)} 个图块）：" + "，".join(
            f"{kind} {'✓' if share >= most else '✗'}（{share:.0%}）" for kind, share in shares.items()))
    return "\n".join(lines)


def alignment_summary(words, regions, k: int | None = None, most: float = 0.5) -> str:
    """The same over several images (one :class:`PatchWords` and region list each), patches pooled by kind: one
    line per kind, without exact shares (they move a little between machines)."""
    hits, total = Counter(), Counter()
    for pw, regs in zip(words, regions, strict=True):
        for _, patches, expected in regs:
            for kind, ids in expected.items():
                hits[kind] += _hits(pw, patches, ids, k)
                total[kind] += len(patches)
    return "\n".join(f"{kind}：{'过半的图块 ✓' if n and hits[kind] / n >= most else '不到一半的图块 ✗'}"
                     for kind, n in total.items())
