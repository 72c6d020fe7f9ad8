"""Shared pieces of ``train_step.py`` and ``generate.py``: model shapes, synthetic caption batches with the real token
ids, FLOP counts, timing, device facts, JSON output, and the summary table (``python benchmarks/common.py summary``).

No tokenizer is needed on the GPU machine: the chat template's token ids are written out below (checked against the
real Qwen3 tokenizer by ``tests/test_benchmarks.py`` and by every ``--mini`` run). Nothing here imports
``llava_lib.data``, ``llava_lib.mini``, ``modelscope`` or ``dashscope`` at import time.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llava_lib.process import IGNORE_INDEX, IMAGE_PAD_ID  # noqa: E402

# ----------------------------------------------------------------------------------------------- token ids
# Qwen3's chat template for the Stage-1 sample (process.caption_conversation, enable_thinking=False):
#   <|im_start|>user\n <|vision_start|> 197 x <|image_pad|> <|vision_end|> \n请描述这张图片。<|im_end|>\n
#   <|im_start|>assistant\n<think>\n\n</think>\n\n {caption} <|im_end|>\n
PREFIX_IDS = [151644, 872, 198]                          # <|im_start|> user \n
VISION_START_ID, VISION_END_ID = 151652, 151653
PROMPT_IDS = [198, 14880, 53481, 108893, 45930, 1773,    # \n 请 描述 这张 图片 。
              151645, 198, 151644, 77091, 198,           # <|im_end|> \n <|im_start|> assistant \n
              151667, 271, 151668, 271]                  # <think> \n\n </think> \n\n
ANSWER_END_IDS = [151645, 198]                           # <|im_end|> (learned) \n (not learned)
PAD_ID = 151643                                          # <|endoftext|>, Qwen3's pad token
N_BPE = 151643                                           # ordinary tokens are 0 .. 151642
TEXT_OVERHEAD = len(PREFIX_IDS) + len(PROMPT_IDS) + len(ANSWER_END_IDS)   # 20 text tokens around the caption
MAX_TEXT_TOKENS = 128                                    # TrainConfig.max_text_tokens


def prompt_ids(n_image_tokens: int = 197) -> list[int]:
    """The chat prompt with one image, ending where the assistant's answer starts (add_generation_prompt)."""
    return PREFIX_IDS + [VISION_START_ID] + [IMAGE_PAD_ID] * n_image_tokens + [VISION_END_ID] + PROMPT_IDS


def make_sample(rng: np.random.Generator, text_tokens: int, n_image_tokens: int = 197) -> tuple[list[int], list[int]]:
    """(ids, labels) of one caption sample with ``text_tokens`` tokens outside the image block.

    The caption is random ordinary token ids; labels are the caption and its ``<|im_end|>`` (as process does).
    """
    n_caption = max(1, text_tokens - TEXT_OVERHEAD)
    caption = rng.integers(0, N_BPE, n_caption).tolist()
    head = prompt_ids(n_image_tokens)
    ids = head + caption + ANSWER_END_IDS
    labels = [IGNORE_INDEX] * len(head) + caption + [ANSWER_END_IDS[0], IGNORE_INDEX]
    limit = MAX_TEXT_TOKENS + n_image_tokens + 2
    return ids[:limit], labels[:limit]


def draw_text_lengths(rng: np.random.Generator, n: int, lo: int = 40, hi: int = 128) -> np.ndarray:
    """Text tokens per sample (outside the image block), uniform in ``[lo, hi]``: Chinese dense captions of
    SA1B-Dense-Caption run from a sentence to past the 128-token cut (see docs/performance.md)."""
    return rng.integers(lo, hi + 1, n)


def collate_ids(seqs, pixel_values: torch.Tensor) -> dict:
    """Right-padded batch in ``process.collate``'s format (``pixel_values`` ``[B,3,224,224]``)."""
    T = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab) in enumerate(seqs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
        mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values,
            "skipped": []}


def make_batch(rng: np.random.Generator, lengths, pixel_values: torch.Tensor, n_image_tokens: int = 197) -> dict:
    return collate_ids([make_sample(rng, int(n), n_image_tokens) for n in lengths], pixel_values[:len(lengths)])


# ----------------------------------------------------------------------------------------------- shapes
# Qwen/Qwen3-0.6B's config.json (the fields that matter for speed and numerics).
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                  attention_bias=False, bos_token_id=151643, eos_token_id=151645)
# Chinese-CLIP ViT-B/16's vision side (iic/multi-modal_clip-vit-base-patch16_zh).
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# CI-sized stand-ins: same classes and vocabulary; 64 px images (patch 16: 17 image tokens instead of 197) so that
# the textbook's full-vocabulary logits fit a CPU minute. ``--mini-world`` loads the built mini world instead.
MINI_LLM = dict(QWEN3_0_6B, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
MINI_VIT = dict(VIT_B16, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                image_size=64)
MINI_TEXT_TOKENS = (24, 64)
REAL_TEXT_TOKENS = (40, 128)


def build_towers(mini: bool, device: torch.device, seed: int = 0, init_std: float | None = None,
                 attn: str | None = None, mini_world: bool = False):
    """Random-weight ``(vision_model, llm)`` in fp32 on ``device`` at the real shapes (or CI-sized with ``mini``).

    With ``mini_world`` and a built mini world (``python -m llava_lib.mini build``), its trained towers are loaded
    instead (``llava_lib.config``; 224 px, slower). Both towers are frozen and in eval mode.
    """
    from transformers import ChineseCLIPVisionConfig, ChineseCLIPVisionModel, Qwen3Config, Qwen3ForCausalLM

    from llava_lib.model.loading import pick_attention
    attn = attn or pick_attention(device)
    if mini_world:
        loaded = _load_mini_world(device, attn)
        if loaded is not None:
            return loaded
    torch.manual_seed(seed)
    lcfg = dict(MINI_LLM if mini else QWEN3_0_6B)
    if init_std is not None:
        lcfg["initializer_range"] = init_std
    vcfg = ChineseCLIPVisionConfig(**(MINI_VIT if mini else VIT_B16))
    try:  # initialise on the device itself (seconds on a GPU instead of ~20 s of CPU for 0.6B weights)
        with torch.device(device):
            llm = Qwen3ForCausalLM(Qwen3Config(**lcfg))
            vm = ChineseCLIPVisionModel(vcfg)
    except Exception as e:  # noqa: BLE001 - fall back to a CPU initialisation
        print(f"[bench] 在 {device} 上直接初始化失败（{type(e).__name__}: {e}），改为在 CPU 上初始化后搬运。")
        torch.manual_seed(seed)
        llm = Qwen3ForCausalLM(Qwen3Config(**lcfg)).to(device)
        vm = ChineseCLIPVisionModel(vcfg).to(device)
    llm.config._attn_implementation = attn
    vm.config._attn_implementation = "sdpa"
    for m in (llm, vm):
        m.requires_grad_(False).eval()
    llm.source = vm.source = "random weights (mini shapes)" if mini else "random weights (real shapes)"
    return vm, llm


def _load_mini_world(device, attn):
    try:
        from llava_lib import config
        paths = config.resolve("mini")
        if not ((Path(paths.llm_path) / "config.json").exists() and Path(paths.clip_path).exists()):
            return None
        from llava_lib.model.loading import load_llm, load_vision_tower
        llm = load_llm(paths.llm_path, device, torch.float32, attn)
        vm = load_vision_tower(paths.clip_path, device, torch.float32).vision_model
    except Exception as e:  # noqa: BLE001 - fall back to random weights
        print(f"[bench] 迷你世界模型无法加载（{e}），改用随机权重。")
        return None
    vm.requires_grad_(False).eval()
    llm.source = vm.source = f"mini world ({paths.llm_path})"
    return vm, llm


def frozen_dtype(device: torch.device) -> torch.dtype:
    from llava_lib.model.loading import default_dtype
    return default_dtype(device)


# ----------------------------------------------------------------------------------------------- FLOPs
def llm_matmul_params(cfg) -> int:
    """Weights a token passes through in one Qwen3 forward, embedding and head excluded."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (D * q + 2 * D * kv + q * D + 3 * D * I)


def vision_matmul_params(vcfg) -> int:
    D, I = vcfg.hidden_size, vcfg.intermediate_size
    return vcfg.num_hidden_layers * (4 * D * D + 2 * D * I)


FLOP_FORMULA = (
    "per sample, T = real (unpadded) tokens, n = label tokens, P = LLM matmul weights without embedding/head "
    "(440M for Qwen3-0.6B), L layers, A = heads x head_dim, V = vocab, D = LLM width; vision: Pv matmul weights "
    "(85M), Lv layers, Dv width, 197 tokens. "
    "LLM = 4*P*T (forward 2PT + activation-only backward 2PT: no weight gradients) + 6*L*A*T^2 (causal attention, "
    "forward 2LAT^2 + backward 4LAT^2); head = 4*D*V*n (forward + backward at label positions only); "
    "vision = 2*Pv*197 + 4*Lv*Dv*197^2 + patch-embedding (forward only, frozen, no_grad); "
    "projection = 4*Dv*D*197 (forward + weight gradient). The same useful work is credited to every variant, "
    "so TFLOP/s ratios equal samples/s ratios; padding and recomputation are not credited.")


def batch_flops(batch: dict, llm_cfg, vis_cfg) -> float:
    """Useful FLOPs of one training step on ``batch`` (FLOP_FORMULA)."""
    T = batch["attention_mask"].sum(1).double()
    n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    B = batch["input_ids"].shape[0]
    A = llm_cfg.num_attention_heads * llm_cfg.head_dim
    llm = 4.0 * llm_matmul_params(llm_cfg) * float(T.sum()) + 6.0 * llm_cfg.num_hidden_layers * A * float((T ** 2).sum())
    head = 4.0 * llm_cfg.hidden_size * llm_cfg.vocab_size * n
    patches = (vis_cfg.image_size // vis_cfg.patch_size) ** 2
    n_img = patches + 1
    p = vis_cfg.patch_size
    vision = B * (2.0 * vision_matmul_params(vis_cfg) * n_img + 4.0 * vis_cfg.num_hidden_layers * vis_cfg.hidden_size
                  * n_img ** 2 + 2.0 * 3 * p * p * vis_cfg.hidden_size * patches)
    proj = B * 4.0 * vis_cfg.hidden_size * llm_cfg.hidden_size * n_img
    return llm + head + vision + proj


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def peak_matmul_tflops(device: torch.device) -> dict:
    """The card's measured dense rate: a large bf16 matmul on CUDA (8192^3), a small fp32 one on a CPU."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        n, dtype, reps = 512, torch.float32, 3
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    del a, b
    free_memory(device)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / dt / 1e12}


def device_info(device: torch.device) -> dict:
    import transformers
    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host_cpus": os.cpu_count(),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def limit_cpu_threads(device: torch.device, threads: int | None = None) -> None:
    """One CPU thread on a CPU run by default: on a shared 2-core machine a second thread made the mini step 4x
    slower (other processes' load), not faster. A GPU run keeps its defaults."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads or 1))


def write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1, default=_jsonable), encoding="utf-8")
    os.replace(tmp, p)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.dtype):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    return str(x)


def check_prompt_ids(tokenizer) -> dict:
    """The written-out ids above against the real tokenizer and ``process.encode_conversation``."""
    from llava_lib import process
    caption = "图中有一个红色的圆形，位于画面中央。"
    ids, labels = process.encode_conversation(tokenizer, process.caption_conversation(caption), 197,
                                              max_text_tokens=MAX_TEXT_TOKENS)
    cap_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    head = prompt_ids(197)
    expect_ids = head + cap_ids + ANSWER_END_IDS
    expect_labels = [IGNORE_INDEX] * len(head) + cap_ids + [ANSWER_END_IDS[0], IGNORE_INDEX]
    gen, _ = process.encode_conversation(tokenizer, process.caption_conversation(None), 197,
                                         add_generation_prompt=True)
    return {"train_sample_matches": ids == expect_ids and labels == expect_labels,
            "generation_prompt_matches": gen == head, "pad_id_matches": tokenizer.pad_token_id == PAD_ID}


def load_tokenizer_for_mini():
    """The real Qwen3 tokenizer, offline: the mini world's copy if built, else rebuilt once into the cache."""
    from llava_lib import config
    from transformers import AutoTokenizer
    for d in (config.mini_root() / "tokenizer", config.llava_home() / "bench" / "qwen_tokenizer"):
        if (d / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(d))
    from llava_lib.mini.tokenizer import build_qwen_tokenizer  # needs dashscope (CPU side only)
    return build_qwen_tokenizer(config.llava_home() / "bench" / "qwen_tokenizer")


# ----------------------------------------------------------------------------------------------- summary
def _fmt(x, spec=".1f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary(train_json: str | None, gen_json: str | None) -> str:
    lines = []
    for path in (train_json, gen_json):
        if path and Path(path).exists():
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            lines.append(f"== {Path(path).name}: {d.get('device', {}).get('name')} "
                         f"(torch {d.get('device', {}).get('torch')}, transformers {d.get('device', {}).get('transformers')})")
            lines += d.get("table", [])
            for k in ("checks_passed", "errors", "skipped"):
                if d.get(k) not in (None, []) or k == "checks_passed" and k in d:
                    lines.append(f"{k}: {d[k]}")
        elif path:
            lines.append(f"== {path}: missing (the run did not get that far)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "summary":
        print(summary(*(sys.argv[2:4] + [None, None])[:2]))
    else:
        print(__doc__)
