"""Build the mini world once (seeded, cached) and check it by numbers.

Steps: the real Qwen tokenizer -> the mini Qwen3, trained and checked in a child process while this one makes the
scenes (JPEG files + SA1B-format parquet), trains and checks the mini Chinese-CLIP and fills the image cache
(through the data pipeline, like the real run) -> build.json. A second call with the same settings finds
build.json and returns in seconds.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock
from PIL import Image

from .. import config
from ..model.checkpoint import atomic_write_json
from ..process import encode_conversation
from . import scenes as sc

BUILD_VERSION = 11  # bump when the builder's output changes, so old caches are rebuilt
MINI_URL_BASE = "http://127.0.0.1:18765/"
CLIP_GALLERY = 10    # also reported: text -> image top-1 within galleries of 10 held-out images (chance: 0.1)
TOP1_MIN = 0.9        # the build is good when CLIP top-1 among all held-out images reaches this ...
LOSS_RATIO_MAX = 0.5  # ... and true captions cost less than half the loss of shuffled ones
CAP_SEG_FORMS = ("dict", "json", "literal", "json")  # one form per train shard; eval uses json
REPORT_PREFIX = "[mini-report] "  # the LM process's last line: its check numbers and timings, as JSON


@dataclass(frozen=True)
class BuildSpec:
    seed: int = 1234
    n_train: int = 2400
    n_eval: int = 200
    n_lm_scenes: int = 8000
    train_shards: int = 4
    clip_text_steps: int = 300
    clip_vision_steps: int = 1000  # the image side alone first (see clip_train.train_clip) ...
    clip_steps: int = 200          # ... then both towers
    clip_batch: int = 16
    llm_steps: int = 800
    llm_batch: int = 24
    llm_layers: int = 3  # 4: 15% longer to train, and Stage 1 no better (captions 0.98 vs 0.96, loss 0.010 vs 0.006)
    version: int = BUILD_VERSION


def _log(msg: str) -> None:
    print(f"[mini] {msg}", flush=True)


def url_for(split: str, i: int) -> str:
    return f"{MINI_URL_BASE}{split}/{i:06d}.jpg"


def url_rewrite(root: Path) -> tuple[str, str]:
    """Map the mini world's loopback URLs onto its image folder (no server needed to build the cache)."""
    return MINI_URL_BASE, (root / "images").resolve().as_uri() + "/"


def cap_seg_value(scene: sc.Scene, form: str):
    seg = {"global_caption": scene.caption, "local_caption": sc.local_captions(scene)}
    if form == "dict":
        return seg
    if form == "json":
        return json.dumps(seg, ensure_ascii=False)
    return repr(seg)  # a Python literal, as some SA1B exports store it


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
        form = forms[k % len(forms)]
        rows = range(bounds[k], bounds[k + 1])
        table = pa.table({"url": [url_for(split, i) for i in rows],
                          "cap_seg": [cap_seg_value(scenes[i], form) for i in rows]})
        pq.write_table(table, data_dir / f"{split}-{k:05d}-of-{n_shards:05d}.parquet")


def load_images(root: Path, split: str, n: int) -> torch.Tensor:
    """``[N,3,224,224]`` uint8, decoded from the JPEG files (what the pipeline sees)."""
    arr = np.stack([np.asarray(Image.open(root / "images" / split / f"{i:06d}.jpg").convert("RGB"))
                    for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _manifest_ok(root: Path, spec: BuildSpec) -> bool:
    f = root / "build.json"
    if not f.exists():
        return False
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    needed = [root / "clip" / "config.json", root / "llm" / "config.json", root / "cache" / "train",
              root / "cache" / "eval"]
    return meta.get("spec") == asdict(spec) and all(p.exists() for p in needed)


def build(root: Path | None = None, spec: BuildSpec = BuildSpec(), force: bool = False) -> dict:
    """Build (or reuse) the mini world in ``root`` (default ``config.mini_root()``); returns build.json.

    Two builds at once (two notebooks, a notebook and a terminal) would delete each other's files: a lock file next
    to ``root`` makes the second one wait, then reuse what the first one built.
    """
    root = Path(root or config.mini_root())
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):  # waits as long as the other build takes
        return _build_locked(root, spec, force)


def _build_locked(root: Path, spec: BuildSpec, force: bool) -> dict:
    if not force and _manifest_ok(root, spec):
        _log(f"迷你世界已存在，直接复用：{root}")
        _ensure_sft(root, spec, force)
        return json.loads((root / "build.json").read_text(encoding="utf-8"))
    t0 = time.time()
    # One thread in each of the two training processes (the course's smallest machine has two cores): the same
    # floating-point order on every run, so the same seed gives the same weights and check numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta = _build_steps(root, spec, t0)
    finally:
        torch.set_num_threads(threads)
    _ensure_sft(root, spec, True)
    return meta


def _ensure_sft(root: Path, spec: BuildSpec, force: bool) -> None:
    """The Stage 2 question-and-answer corpus (a second or two to write; also added to an older build)."""
    from .qa import write_corpus
    if force or not (root / "sft").is_dir():
        t0 = time.time()
        write_corpus(root / "sft", spec.seed)
        _log(f"Stage 2 问答语料已写入 {root / 'sft'}（{time.time() - t0:.1f} 秒）")


def _train_llm_worker(root: str, spec_json: str) -> None:
    """Started by :class:`_LLMProcess`: rebuild the Qwen tokenizer, then train, save and check the mini Qwen3."""
    root, spec = Path(root), BuildSpec(**json.loads(spec_json))
    from .lm_train import train_llm
    from .tokenizer import build_qwen_tokenizer
    torch.set_num_threads(1)
    t0 = time.time()
    qwen_tok = build_qwen_tokenizer(root / "tokenizer")
    lm_scenes = sc.make_scenes(spec.n_lm_scenes, spec.seed + 2)
    llm = train_llm(qwen_tok, lm_scenes, steps=spec.llm_steps, batch=spec.llm_batch, layers=spec.llm_layers,
                    seed=spec.seed, log=_log)
    from ..chat import QWEN3_GENERATION  # Qwen3-0.6B's generation_config.json: the chat path reads it
    llm.generation_config.update(**QWEN3_GENERATION)
    llm.save_pretrained(root / "llm")
    qwen_tok.save_pretrained(root / "llm")
    t1 = time.time()
    # The LM's half of the check, here and on the model just saved: the parent is still busy with the CLIP's half.
    metrics = check_lm(root, spec.seed, model=llm.eval(), tokenizer=qwen_tok)
    print(REPORT_PREFIX + json.dumps({"metrics": metrics, "train": round(t1 - t0, 1),
                                      "check": round(time.time() - t1, 1)}), flush=True)


class _LLMProcess:
    """The LM's training in a child process, its log lines passed through to ours (a terminal or a notebook)."""

    def __init__(self, root: Path, spec: BuildSpec):
        import subprocess
        import sys
        import threading
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
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("[mini]"):
                print(line, flush=True)

    def wait(self) -> dict:
        """Wait for the child; returns its report (the JSON of its ``REPORT_PREFIX`` line)."""
        code = self.proc.wait()
        self.reader.join()
        reports = [json.loads(l[len(REPORT_PREFIX):]) for l in self.lines if l.startswith(REPORT_PREFIX)]
        if code != 0 or not reports:
            tail = "\n".join(self.lines[-30:])
            raise RuntimeError(f"迷你 Qwen3 的训练进程失败（退出码 {code}）。它最后的输出：\n{tail}\n"
                               f"修复后请重新运行：{config.BUILD_MINI_CMD}")
        return reports[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _build_steps(root: Path, spec: BuildSpec, t0: float) -> dict:
    random.seed(spec.seed)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    timings = {}

    def lap(name: str) -> None:
        timings[name] = time.time() - t0 - sum(timings.values())

    # The LM and the CLIP do not need each other (the CLIP's word read-out targets word counts, not the LM's
    # embeddings: clip_train.train_clip), so they train at the same time, one core each. The LM's process also
    # rebuilds the Qwen tokenizer it needs, so it starts at once; everything below runs beside it.
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
        captions = [s.caption for s in train + evals]
        bert_tok = build_bert_tokenizer(captions + [c for s in train for c in sc.local_captions(s)], root / "clip")
        lap("scenes")

        _log(f"3/6 同时训练迷你 Chinese-CLIP（{spec.clip_vision_steps + spec.clip_steps} 步）...")
        from .clip_train import train_clip
        from transformers import ChineseCLIPProcessor
        try:  # the PIL backend needs no torchvision (transformers 5.2x); older releases have only the one class
            from transformers import ChineseCLIPImageProcessorPil as ChineseCLIPImageProcessor
        except ImportError:
            from transformers import ChineseCLIPImageProcessor
        # CLIP sees its own scenes, never the Stage 1 train/eval images (a real CLIP never saw SA-1B captions).
        clip_scenes = sc.make_scenes((spec.clip_vision_steps + spec.clip_steps) * spec.clip_batch, spec.seed + 4)
        clip = train_clip(clip_scenes, bert_tok, vision_steps=spec.clip_vision_steps, steps=spec.clip_steps,
                          batch=spec.clip_batch, text_steps=spec.clip_text_steps,
                          text_scenes=sc.make_scenes(spec.n_lm_scenes, spec.seed + 3), seed=spec.seed, log=_log)
        clip.save_pretrained(root / "clip")
        image_processor = ChineseCLIPImageProcessor(size={"shortest_edge": 224},
                                                    crop_size={"height": 224, "width": 224})
        ChineseCLIPProcessor(image_processor=image_processor, tokenizer=bert_tok).save_pretrained(root / "clip")
        lap("clip")

        _log("4/6 用数据管线把图片抓取进缓存（与真实训练相同的代码）...")
        from ..data import prepare_cache
        rewrite = url_rewrite(root)
        prepare_cache(root / "sa1b", root / "cache" / "train", url_rewrite=rewrite, workers=4, progress=False)
        prepare_cache(root / "sa1b_eval", root / "cache" / "eval", url_rewrite=rewrite, workers=4, progress=False)
        lap("cache")

        _log("5/6 检查 CLIP：文本 → 图片检索准确率 ...")
        clip_metrics = check_clip(root, spec.seed)
        lap("check_clip")
        _log("6/6 等迷你 Qwen3 训练完（它自己检查对真/乱序描述的损失）...")
        lm_report = llm_proc.wait()
        lap("llm_wait")
    finally:
        llm_proc.kill()

    metrics = _verdict(clip_metrics, lm_report["metrics"])
    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["llm_process"] = {"train": lm_report["train"], "check": lm_report["check"]}
    meta = {"spec": asdict(spec), "metrics": metrics, "seconds": round(time.time() - t0, 1), "timings": timings,
            "torch": torch.__version__}
    atomic_write_json(root / "build.json", meta)
    _log(f"完成，用时 {meta['seconds']} 秒：{root}")
    return meta


def _eval_seed(root: Path, seed: int | None) -> int:
    if seed is not None:
        return seed
    manifest = root / "build.json"
    return json.loads(manifest.read_text(encoding="utf-8"))["spec"]["seed"] if manifest.exists() else BuildSpec().seed


def held_out_scenes(root: Path | None = None, n: int | None = None) -> list[sc.Scene]:
    """The scenes of the held-out split (``images/eval``, ``cache/eval``), in its order: what each eval image shows,
    object by object (the patches each object covers included)."""
    root = Path(root or config.mini_root())
    n = len(list((root / "images" / "eval").glob("*.jpg"))) if n is None else n
    return sc.make_scenes(n, _eval_seed(root, None) + 1)


def check(root: Path | None = None, seed: int | None = None) -> dict:
    """The numbers that say the mini world is usable, computed from the saved directories."""
    root = Path(root or config.mini_root())
    seed = _eval_seed(root, seed)
    return _verdict(check_clip(root, seed), check_lm(root, seed))


def _verdict(clip_metrics: dict, lm_metrics: dict) -> dict:
    top1 = clip_metrics["clip_text_to_image_top1"]
    true_loss, shuffled_loss = lm_metrics["lm_loss_true_vs_shuffled"]
    return {**clip_metrics, **lm_metrics,
            "ok": bool(top1 >= TOP1_MIN and true_loss * LOSS_RATIO_MAX < shuffled_loss)}


@torch.no_grad()
def check_clip(root: Path, seed: int | None = None) -> dict:
    """Text -> image retrieval of the saved mini CLIP on the held-out images: among all of them (chance 1/200), and
    within galleries of :data:`CLIP_GALLERY`."""
    from transformers import AutoTokenizer, ChineseCLIPModel
    from .clip_train import retrieval_top1, text_image_similarity
    root = Path(root)
    n_eval = len(list((root / "images" / "eval").glob("*.jpg")))
    captions = [s.caption for s in sc.make_scenes(n_eval, _eval_seed(root, seed) + 1)]
    clip = ChineseCLIPModel.from_pretrained(str(root / "clip")).eval()
    sim = text_image_similarity(clip, AutoTokenizer.from_pretrained(str(root / "clip")),
                                load_images(root, "eval", n_eval), captions)
    return {"clip_text_to_image_top1": round(retrieval_top1(sim, captions), 4),
            f"clip_text_to_image_top1_gallery{CLIP_GALLERY}": round(retrieval_top1(sim, captions, CLIP_GALLERY), 4),
            "n_eval": n_eval}


@torch.no_grad()
def check_lm(root: Path, seed: int | None = None, n: int = 50, model=None, tokenizer=None) -> dict:
    """Mean loss of the saved mini LM on the first ``n`` held-out captions, true vs. with shuffled tokens.

    ``model`` / ``tokenizer``: the ones just saved to ``root/llm`` (the build passes them, to skip a reload).
    """
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    from .loss import zero_rows_head_loss
    root = Path(root)
    tok = tokenizer or AutoTokenizer.from_pretrained(str(root / "llm"))
    llm = (model or Qwen3ForCausalLM.from_pretrained(str(root / "llm"))).eval().requires_grad_(False)
    # The mini profile's head loss: the exact full-vocabulary loss from the mini LM's live head rows.
    head_loss = zero_rows_head_loss(llm.lm_head)
    conv = [{"role": "user", "content": "请描述一个简单的场景。"}]
    prompt, _ = encode_conversation(tok, conv, 0, add_generation_prompt=True, enable_thinking=False)
    rng = np.random.default_rng(0)

    def answer_loss(answer_ids: list[int]) -> float:
        ids = torch.tensor([prompt + answer_ids])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        return float(head_loss(llm.lm_head, llm.model(input_ids=ids).last_hidden_state, labels).loss)

    true_l, shuf_l = [], []
    for s in sc.make_scenes(n, _eval_seed(root, seed) + 1):  # the first n held-out scenes (drawn in order)
        ids = tok(s.caption, add_special_tokens=False)["input_ids"]
        perm = list(ids)
        rng.shuffle(perm)
        true_l.append(answer_loss(ids))
        shuf_l.append(answer_loss(perm))
    return {"lm_loss_true_vs_shuffled": [round(float(np.mean(true_l)), 4), round(float(np.mean(shuf_l)), 4)]}
