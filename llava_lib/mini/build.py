"""Build the mini world once (seeded, cached in ``build.json``) and check it by numbers: a child process makes the
real Qwen tokenizer and trains the mini Qwen3 while this one makes the scenes (JPEG files + SA1B-format parquet),
trains the mini Chinese-CLIP and fills the image cache through the data pipeline."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock

from .. import config
from ..files import atomic_write_json
from ..process import encode_conversation
from . import scenes as sc

BUILD_VERSION = 11  # bump when the builder's output changes, so old caches are rebuilt
MINI_URL_BASE = "http://127.0.0.1:18765/"
CLIP_GALLERY = 10     # also reported: text -> image top-1 within galleries of 10 held-out images (chance: 0.1)
TOP1_MIN = 0.9        # the build is good when CLIP top-1 among all held-out images reaches this ...
LOSS_RATIO_MAX = 0.5  # ... and true captions cost less than half the loss of shuffled ones
CAP_SEG_FORMS = ("dict", "json", "literal", "json")  # one form per train shard, as SA1B exports vary; eval: json


@dataclass(frozen=True)
class BuildSpec:
    seed: int = 1234
    n_train: int = 2400
    n_eval: int = 200
    n_lm_scenes: int = 8000
    train_shards: int = 4
    clip_text_steps: int = 300
    clip_vision_steps: int = 1000  # the image side alone first (clip_train.train_clip) ...
    clip_steps: int = 200          # ... then both towers
    clip_batch: int = 16
    llm_steps: int = 800
    llm_batch: int = 24
    llm_layers: int = 3  # 4: 15% longer to train, and Stage 1 no better (captions 0.98 vs 0.96)
    version: int = BUILD_VERSION


def _log(msg: str) -> None:
    print(f"[mini] {msg}", flush=True)


def url_for(split: str, i: int) -> str:
    return f"{MINI_URL_BASE}{split}/{i:06d}.jpg"


def url_rewrite(root: Path) -> tuple[str, str]:
    """Map the mini world's loopback URLs onto its image folder (no server needed to build the cache)."""
    return MINI_URL_BASE, (root / "images").resolve().as_uri() + "/"


def write_split(root: Path, split: str, scenes: list[sc.Scene], n_shards: int, forms) -> None:
    """JPEG files under images/<split>/ and parquet shards with columns url, cap_seg."""
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes):
        sc.render(s).save(img_dir / f"{i:06d}.jpg", quality=92)
    data_dir = root / ("sa1b" if split == "train" else "sa1b_eval") / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(scenes), n_shards + 1).astype(int)
    for k in range(n_shards):
        form, rows = forms[k % len(forms)], range(bounds[k], bounds[k + 1])
        segs = [{"global_caption": scenes[i].caption, "local_caption": sc.local_captions(scenes[i])} for i in rows]
        cap_seg = {"dict": segs, "json": [json.dumps(g, ensure_ascii=False) for g in segs],
                   "literal": [repr(g) for g in segs]}[form]  # a Python literal, as some SA1B exports store it
        table = pa.table({"url": [url_for(split, i) for i in rows], "cap_seg": cap_seg})
        pq.write_table(table, data_dir / f"{split}-{k:05d}-of-{n_shards:05d}.parquet")


def _manifest_ok(root: Path, spec: BuildSpec) -> bool:
    try:
        meta = json.loads((root / "build.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    needed = ["clip/config.json", "llm/config.json", "cache/train", "cache/eval"]
    return meta.get("spec") == asdict(spec) and all((root / p).exists() for p in needed)


def build(root: Path | None = None, spec: BuildSpec = BuildSpec(), force: bool = False) -> dict:
    """Build (or reuse) the mini world in ``root`` (default ``config.mini_root()``); returns build.json. A lock file
    next to ``root`` makes a second build at once (two notebooks) wait, then reuse the first one's."""
    root = Path(root or config.mini_root())
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):
        if force or not _manifest_ok(root, spec):
            # One thread in each of the two training processes: the same floating-point order on every run, so
            # the same seed gives the same weights and check numbers (the smallest course machine has two cores).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                _build_steps(root, spec, time.time())
            finally:
                torch.set_num_threads(threads)
        else:
            _log(f"迷你世界已存在，直接复用：{root}")
        if not (root / "sft").is_dir():  # the Stage 2 question-and-answer corpus (also added to an older build)
            from .qa import write_corpus
            t0 = time.time()
            write_corpus(root / "sft", spec.seed)
            _log(f"Stage 2 问答语料已写入 {root / 'sft'}（{time.time() - t0:.1f} 秒）")
        return json.loads((root / "build.json").read_text(encoding="utf-8"))


def _train_llm_worker(root: str, spec_json: str) -> None:
    """Run by :class:`_LLMProcess`: rebuild the Qwen tokenizer, then train and save the mini Qwen3."""
    root, spec = Path(root), BuildSpec(**json.loads(spec_json))
    from ..chat import QWEN3_GENERATION  # Qwen3-0.6B's generation_config.json: the chat path reads it
    from .lm_train import train_llm
    from .tokenizer import build_qwen_tokenizer
    torch.set_num_threads(1)
    qwen_tok = build_qwen_tokenizer(root / "tokenizer")
    llm = train_llm(qwen_tok, sc.make_scenes(spec.n_lm_scenes, spec.seed + 2), steps=spec.llm_steps,
                    batch=spec.llm_batch, layers=spec.llm_layers, seed=spec.seed, log=_log)
    llm.generation_config.update(**QWEN3_GENERATION)
    llm.save_pretrained(root / "llm")
    qwen_tok.save_pretrained(root / "llm")


class _LLMProcess:
    """The LM's training in a child process, its ``[mini]`` log lines passed through to ours."""

    def __init__(self, root: Path, spec: BuildSpec):
        package_parent = str(Path(__file__).resolve().parents[2])  # importable even when not pip-installed
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from llava_lib.mini.build import _train_llm_worker as w; w(*sys.argv[1:])",
             str(root), json.dumps(asdict(spec))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("[mini]"):
                print(self.lines[-1], flush=True)

    def wait(self) -> None:
        code = self.proc.wait()
        self.reader.join()
        if code != 0:
            tail = "\n".join(self.lines[-30:])
            raise RuntimeError(f"迷你 Qwen3 的训练进程失败（退出码 {code}）。它最后的输出：\n{tail}\n"
                               f"修复后请重新运行：{config.BUILD_MINI_CMD}")

    def kill(self) -> None:
        self.proc.kill()  # nothing happens once it has exited
        self.proc.wait()


def _build_steps(root: Path, spec: BuildSpec, t0: float) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    timings = {}

    def lap(name: str) -> None:
        timings[name] = time.time() - t0 - sum(timings.values())

    # The LM and the CLIP do not need each other (the CLIP's word read-out targets word counts, not the LM's
    # embeddings), so they train at the same time, one core each.
    _log(f"1/6 在另一个进程里：用 dashscope 附带的 qwen.tiktoken 重建真实的 Qwen3 分词器，"
         f"再训练迷你 Qwen3（{spec.llm_steps} 步）...")
    llm_proc = _LLMProcess(root, spec)
    try:
        _log("2/6 同时生成合成图片与中文描述，建 CLIP 的字级分词器 ...")
        from .tokenizer import build_bert_tokenizer
        train = sc.make_scenes(spec.n_train, spec.seed)
        evals = sc.make_scenes(spec.n_eval, spec.seed + 1)
        write_split(root, "train", train, spec.train_shards, CAP_SEG_FORMS)
        write_split(root, "eval", evals, 1, ("json",))
        texts = [s.caption for s in train + evals] + [c for s in train for c in sc.local_captions(s)]
        bert_tok = build_bert_tokenizer(texts, root / "clip")
        lap("scenes")

        _log(f"3/6 同时训练迷你 Chinese-CLIP（{spec.clip_vision_steps + spec.clip_steps} 步）...")
        from transformers import ChineseCLIPImageProcessorPil, ChineseCLIPProcessor

        from .clip_train import train_clip
        # CLIP sees its own scenes, never the Stage 1 images (a real CLIP never saw SA-1B captions).
        clip_scenes = sc.make_scenes((spec.clip_vision_steps + spec.clip_steps) * spec.clip_batch, spec.seed + 4)
        clip = train_clip(clip_scenes, bert_tok, vision_steps=spec.clip_vision_steps, steps=spec.clip_steps,
                          batch=spec.clip_batch, text_steps=spec.clip_text_steps,
                          text_scenes=sc.make_scenes(spec.n_lm_scenes, spec.seed + 3), seed=spec.seed, log=_log)
        clip.save_pretrained(root / "clip")
        pixels = ChineseCLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        ChineseCLIPProcessor(image_processor=pixels, tokenizer=bert_tok).save_pretrained(root / "clip")
        lap("clip")

        _log("4/6 用数据管线把图片抓取进缓存（与真实训练相同的代码）...")
        from ..data import prepare_cache
        for src, split in (("sa1b", "train"), ("sa1b_eval", "eval")):
            prepare_cache(root / src, root / "cache" / split, url_rewrite=url_rewrite(root), workers=4, progress=False)
        lap("cache")

        _log("5/6 等迷你 Qwen3 训练完 ...")
        llm_proc.wait()
        lap("llm_wait")
    finally:
        llm_proc.kill()
    _log("6/6 检查：CLIP 文本 → 图片检索准确率，迷你 Qwen3 对真/乱序描述的损失 ...")
    metrics = check(root, spec.seed)
    lap("check")
    meta = {"spec": asdict(spec), "metrics": metrics, "seconds": round(time.time() - t0, 1),
            "timings": {k: round(v, 1) for k, v in timings.items()}, "torch": torch.__version__}
    atomic_write_json(root / "build.json", meta)
    _log(f"完成，用时 {meta['seconds']} 秒：{root}")


def held_out_scenes(root: Path | None = None, n: int | None = None, seed: int | None = None) -> list[sc.Scene]:
    """The scenes of the held-out split (``images/eval``, ``cache/eval``), in its order (``seed``: the build's)."""
    root = Path(root or config.mini_root())
    n = len(list((root / "images" / "eval").glob("*.jpg"))) if n is None else n
    if seed is None:
        manifest = root / "build.json"
        seed = json.loads(manifest.read_text(encoding="utf-8"))["spec"]["seed"] if manifest.exists() else BuildSpec.seed
    return sc.make_scenes(n, seed + 1)


def check(root: Path | None = None, seed: int | None = None) -> dict:
    """The numbers that say the mini world is usable, computed from the saved directories."""
    root = Path(root or config.mini_root())
    clip_metrics, lm_metrics = check_clip(root, seed), check_lm(root, seed)
    true_loss, shuffled_loss = lm_metrics["lm_loss_true_vs_shuffled"]
    ok = clip_metrics["clip_text_to_image_top1"] >= TOP1_MIN and true_loss * LOSS_RATIO_MAX < shuffled_loss
    return {**clip_metrics, **lm_metrics, "ok": bool(ok)}


def _top1(sim: torch.Tensor, captions: list[str], gallery: int) -> float:
    """Text -> image top-1 within consecutive galleries of ``gallery`` images (an image with the same caption
    counts as right)."""
    hits = []
    for s in range(0, len(captions), gallery):
        best = sim[s:s + gallery, s:s + gallery].argmax(1).tolist()
        hits += [captions[s + b] == captions[s + i] for i, b in enumerate(best)]
    return float(np.mean(hits))


def check_clip(root: Path, seed: int | None = None) -> dict:
    """Text -> image retrieval of the saved mini CLIP on the held-out images, through the course's own matcher:
    among all of them (chance 1/200), and within galleries of :data:`CLIP_GALLERY`."""
    from PIL import Image

    from ..retrieval import ClipMatcher
    root = Path(root)
    files = sorted((root / "images" / "eval").glob("*.jpg"))
    captions = [s.caption for s in held_out_scenes(root, len(files), seed)]
    matcher = ClipMatcher.from_pretrained(root / "clip", device="cpu")
    sim = matcher.text_scores(captions, matcher.encode_images([Image.open(f).convert("RGB") for f in files]))
    return {"clip_text_to_image_top1": round(_top1(sim, captions, len(files)), 4),
            f"clip_text_to_image_top1_gallery{CLIP_GALLERY}": round(_top1(sim, captions, CLIP_GALLERY), 4),
            "n_eval": len(files)}


@torch.no_grad()
def check_lm(root: Path, seed: int | None = None) -> dict:
    """Mean loss of the saved mini LM on the first 50 held-out captions, true vs. with shuffled tokens."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from .loss import zero_rows_head_loss
    root = Path(root)
    tok = AutoTokenizer.from_pretrained(str(root / "llm"))
    llm = Qwen3ForCausalLM.from_pretrained(str(root / "llm")).eval().requires_grad_(False)
    head_loss = zero_rows_head_loss(llm.lm_head)  # the mini profile's exact, cheaper head loss
    conv = [{"role": "user", "content": "请描述一个简单的场景。"}]
    prompt, _ = encode_conversation(tok, conv, 0, add_generation_prompt=True, enable_thinking=False)
    rng = np.random.default_rng(0)

    def answer_loss(answer_ids: list[int]) -> float:
        ids = torch.tensor([prompt + answer_ids])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        return float(head_loss(llm.lm_head, llm.model(input_ids=ids).last_hidden_state, labels).loss)

    true_l, shuf_l = [], []
    for s in held_out_scenes(root, 50, seed):
        ids = tok(s.caption, add_special_tokens=False)["input_ids"]
        perm = list(ids)
        rng.shuffle(perm)
        true_l.append(answer_loss(ids))
        shuf_l.append(answer_loss(perm))
    return {"lm_loss_true_vs_shuffled": [round(float(np.mean(true_l)), 4), round(float(np.mean(shuf_l)), 4)]}
