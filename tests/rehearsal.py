"""``python tests/rehearsal.py [--dir DIR]``: the full profile end to end at real sizes, offline, random weights.

It writes what the downloads would bring (Chinese-CLIP in ModelScope's layout, Qwen3-0.6B with its published config
and tokenizer, SA1B-Dense-Caption shards whose signed links a loopback server answers, some with 403 or 404), then runs
the student's commands on them: prepare, train, resume, chat. What fails here is a layout, a shape, a path or a
message the real run would trip over; random weights say nothing about quality.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# iic/multi-modal_clip-vit-base-patch16_zh: vision_model_config.json and text_model_config.json (RoBERTa-wwm-base).
CLIP_VISION = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16)
CLIP_TEXT = dict(vocab_size=21128, text_attention_probs_dropout_prob=0.1, text_hidden_act="gelu",
                 text_hidden_dropout_prob=0.1, text_hidden_size=768, text_initializer_range=0.02,
                 text_intermediate_size=3072, text_max_position_embeddings=512, text_num_attention_heads=12,
                 text_num_hidden_layers=12, text_type_vocab_size=2)
BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}  # bert-base-chinese's ids
# Qwen/Qwen3-0.6B's config.json (in transformers 4.51's format, as a download brings it) and generation_config.json.
QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
QWEN3_GENERATION = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                    "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}

TRAIN_ROWS, EVAL_ROWS, LIMIT, EVAL_LIMIT = 24, 8, 16, 4
FAULTS = {("train", 2): 403, ("train", 5): 404, ("train", 9): 403, ("eval", 1): 404}  # (shard, row) -> status
TRAIN_FLAGS = ["--batch-size", "2", "--eval-limit", "2", "--caption-show-n", "0", "--save-every", "1",
               "--max-text-tokens", "32", "--no-tensorboard", "--num-workers", "0", "--no-progress"]
CHAT_CODE = """import sys
from llava_lib.chat import ChatSession
from llava_lib.config import resolve
from llava_lib.model.loading import load_trained
model, tok, meta = load_trained(sys.argv[1], resolve())
chat = ChatSession(model, tok, image=sys.argv[2], enable_thinking=True, generation={"max_new_tokens": 8}, seed=0)
reply, c = chat.ask("请描述这张图片。"), chat.generation_config()
print(f"生成设置：do_sample={c.do_sample} temperature={c.temperature} top_p={c.top_p} top_k={c.top_k}")
print(f"回答（结束原因 {chat.finish_reason}）：{reply!r}")
"""


class RehearsalError(RuntimeError):
    """A step failed; the message holds the command's exit status and the end of its output."""


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def bert_vocab() -> list[str]:
    """21,128 tokens, the specials where BERT (and ModelScope's FullTokenizer) expects them, the rest synthetic."""
    words = [BERT_SPECIALS.get(i, f"[unused{i}]") for i in range(104)] + [chr(c) for c in range(33, 127)]
    return words + [chr(0x4E00 + i) for i in range(CLIP_TEXT["vocab_size"] - len(words))]


def write_clip(dst: Path, seed: int = 0) -> None:
    """A ModelScope-layout Chinese-CLIP directory; the weights come from ModelScope's own ``CLIP`` class."""
    import torch
    from modelscope.models.multi_modal.clip.bert_tokenizer import FullTokenizer
    from modelscope.models.multi_modal.clip.model import CLIP
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    _json(dst / "vision_model_config.json", CLIP_VISION)
    _json(dst / "text_model_config.json", CLIP_TEXT)
    _json(dst / "configuration.json", {"framework": "pytorch", "task": "multi-modal-embedding",
                                       "model": {"type": "clip-multi-modal-embedding"}})
    torch.manual_seed(seed)
    model = CLIP(**CLIP_VISION, **CLIP_TEXT, tokenizer=FullTokenizer(vocab_file=str(dst / "vocab.txt")))
    # As the hub ships it: a training checkpoint, wrapped, with DDP's ``module.`` prefix.
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, dst / "pytorch_model.bin")


def write_qwen(dst: Path, seed: int = 0) -> None:
    """Qwen3-0.6B's directory with random weights, stored in bf16 as the published ``model.safetensors`` is."""
    import torch
    from transformers import AutoConfig, Qwen3ForCausalLM

    from llava_lib.mini.tokenizer import build_qwen_tokenizer
    dst.mkdir(parents=True, exist_ok=True)
    _json(dst / "config.json", QWEN3_CONFIG)
    torch.manual_seed(seed)
    Qwen3ForCausalLM._from_config(AutoConfig.from_pretrained(dst), dtype=torch.bfloat16).save_pretrained(dst)
    # save_pretrained rewrote both files in its own version's format; put back what a download brings.
    _json(dst / "config.json", QWEN3_CONFIG)
    _json(dst / "generation_config.json", QWEN3_GENERATION)
    build_qwen_tokenizer(dst)


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-sized JPEG (SA-1B's are 1500 px on the short side); the noise makes it compress like a photo."""
    from PIL import Image
    img = Image.linear_gradient("L").rotate(90 * seed).resize((width, height)).convert("RGB")
    buf = io.BytesIO()
    Image.blend(img, Image.effect_noise((width, height), 40).convert("RGB"), 0.15).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def dense_caption(seed: int) -> str:
    """A global caption of a few hundred characters, as long as SA1B-Dense-Caption's."""
    parts = ("在画面的左下角，一位穿着红色外套的女士正在低头看手机。|靠近画面中央，一辆白色的小轿车停在路边。|"
             "远处的山坡上，几栋高低错落的居民楼排成一列。|街道的一侧，一只黄狗趴在台阶上晒太阳。|河岸边，一排梧桐树的叶子已经开始泛黄。|"
             "阳光从右上方照下来，在地面上投下清晰的影子。|天空中飘着几朵白云，整体色调偏暖。|背景略微模糊，隐约可以看到来往的行人和车辆。").split("|")
    return "这张照片展示了一个日常的城市场景。" + "".join(random.Random(seed).choices(parts, k=12))


class _Host(SimpleHTTPRequestHandler):
    """Serves the image folder; a path in ``server.expired`` answers 403, as a signed link past its expiry does."""

    def do_GET(self):
        return self.send_error(403) if self.path.split("?", 1)[0] in self.server.expired else super().do_GET()

    def log_message(self, *args):
        pass


@contextmanager
def image_host(folder: Path):
    """A loopback HTTP server for ``folder`` on a free port, stopped on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Host, directory=str(folder)))
    server.folder, server.expired = folder, set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def write_data(root: Path, server) -> None:
    """Two shards under ``root/data/`` (the last one is held out for eval), their signed links served by ``server``:
    an expired link answers 403, a path the server does not know 404."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    images = [photo_jpeg(1500, 2250, 0), photo_jpeg(2250, 1500, 1), photo_jpeg(1500, 2250, 2)]
    for k, (name, n) in enumerate((("train", TRAIN_ROWS), ("eval", EVAL_ROWS))):
        (server.folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if FAULTS.get((name, i)) == 403:
                server.expired.add(f"/{name}/sa_{i:06d}.jpg")
            elif (name, i) not in FAULTS:
                (server.folder / name / f"sa_{i:06d}.jpg").write_bytes(images[i % len(images)])
        urls = [f"http://127.0.0.1:{server.server_port}/{name}/sa_{i:06d}.jpg?Expires=1735689600&OSSAccessKeyId=LTAI5t"
                f"&Signature=s{i:04d}" for i in range(n)]
        caps = [json.dumps({"global_caption": dense_caption(100 * k + i)}, ensure_ascii=False) for i in range(n)]
        (root / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"url": urls, "cap_seg": caps}), root / "data" / f"train-{k:04d}-of-0002.parquet")
    (root / "sample.jpg").write_bytes(images[0])


@contextmanager
def _step(title: str, timings: list):
    print(f"[rehearse] ▶ {title}", flush=True)
    t0 = time.perf_counter()
    yield
    timings.append((title, time.perf_counter() - t0))
    print(f"[rehearse] ✓ {title}：{timings[-1][1]:.1f} 秒", flush=True)


def _run(title: str, args: list[str], env: dict, cwd: Path, expect: tuple[str, ...] = ()) -> str:
    """``python ARGS`` with its output shown, indented, as it comes; RehearsalError if it fails or lacks an ``expect``."""
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace")
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            print(f"    {line}", end="", flush=True)
    finally:  # interrupted: the child must not go on writing into a directory about to be removed
        if proc.poll() is None:
            proc.kill()
    out, code = "".join(lines), proc.wait()
    missing = [p for p in expect if not re.search(p, out)]
    if code != 0 or missing:
        why = f"退出码 {code}" + (f"，输出中没有：{'；'.join(missing)}" if missing else "")
        raise RehearsalError(f"{title}失败（{why}）。输出的最后部分：\n{out[-3000:]}")
    return out


def _history(out_dir: Path, step: int) -> list[dict]:
    return json.loads((out_dir / "checkpoints" / f"step-{step:06d}" / "train_state.json").read_text("utf-8"))["history"]


def rehearse(root: Path) -> dict:
    """Write everything under ``root``, run the student's commands on it; returns timings, outputs and losses."""
    root, timings, outputs = Path(root), [], {}
    if root.exists() and any(root.iterdir()):  # an earlier run's cache and checkpoints would change every output
        raise RehearsalError(f"目录 {root} 不为空：请换一个空目录或新目录（预演的各步输出依赖于从零开始）。")
    clip, llm = root / "models" / "multi-modal_clip-vit-base-patch16_zh", root / "models" / "Qwen3-0.6B"
    data, out_dir = root / "SA1B-Dense-Caption", root / "checkpoints" / "stage1-full"
    with _step("写 Chinese-CLIP ViT-B/16（ModelScope 格式，随机权重）", timings):
        write_clip(clip)
    with _step("写 Qwen3-0.6B（真实配置与分词器，随机权重，bf16 存盘）", timings):
        write_qwen(llm)
    # The student's switch to the full profile, every path inside ``root`` (and no llava.toml from elsewhere).
    (root / "llava.toml").write_text("# 预演：只用环境变量\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_")}
    env.update(LLAVA_PROFILE="full", LLAVA_HOME=str(root / "home"), LLAVA_CONFIG=str(root / "llava.toml"),
               LLAVA_CLIP_PATH=str(clip), LLAVA_LLM_PATH=str(llm), LLAVA_DATA_ROOT=str(data),
               LLAVA_CACHE_DIR=str(root / "image_cache"), LLAVA_CHECKPOINTS_DIR=str(root / "checkpoints"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # whole lines, not redrawn bars
    with image_host(root / "image_host") as server:
        with _step(f"写 SA1B-Dense-Caption 分片（2 个，图片由 127.0.0.1:{server.server_port} 提供）", timings):
            write_data(data, server)
        failed = [status for (shard, row), status in FAULTS.items() if shard == "train" and row < LIMIT]
        with _step(f"python -m llava_lib.data prepare --profile full --limit {LIMIT}", timings):
            outputs["prepare"] = _run("准备图片缓存", ["-m", "llava_lib.data", "prepare", "--profile", "full", "--limit",
                                      str(LIMIT), "--eval-limit", str(EVAL_LIMIT), "--workers", "4", "--no-progress"],
                                      env, root, (rf"链接已过期.*\[http_403\]：{failed.count(403)}",
                                                  rf"本次失败 {len(failed)} 行", r"验证集：最后一个数据分片 train-0001"))
    with _step("python -m llava_lib.train --max-steps 2（第一次运行，转换 Chinese-CLIP）", timings):
        outputs["train"] = _run("训练", ["-m", "llava_lib.train", *TRAIN_FLAGS, "--max-steps", "2"], env, root,
                                (r"正在把 ModelScope 格式的 Chinese-CLIP 转换为", r"转换完成", r"训练后 第 2 步评估"))
    first = _history(out_dir, 2)
    with _step("python -m llava_lib.train --max-steps 3 --resume", timings):
        outputs["resume"] = _run("续训", ["-m", "llava_lib.train", *TRAIN_FLAGS, "--max-steps", "3", "--resume"], env,
                                 root, (r"从检查点 \S+step-000002 继续（第 2 步）", r"训练后 第 3 步评估"))
    resumed = _history(out_dir, 3)
    clip_lines = [line for line in outputs["resume"].splitlines() if "Chinese-CLIP" in line]
    if (len(clip_lines) != 1 or "已存在转换好的" not in clip_lines[0] or len(resumed) != 3
            or [r["loss"] for r in resumed[:2]] != [r["loss"] for r in first] or not resumed[2]["lr"] > 0):
        raise RehearsalError(f"续训没有接上：关于 Chinese-CLIP 的输出 {clip_lines}；第一次的记录 {first}；续训后的记录 "
                             f"{resumed}（应只有一行“已存在转换好的”，前两步的损失不变，第 3 步的学习率大于 0）")
    with _step("对话：load_trained(final) + ChatSession（思考模式），生成 8 个词元", timings):
        outputs["chat"] = _run("对话", ["-c", CHAT_CODE, str(out_dir / "final"), str(data / "sample.jpg")], env, root,
                               (r"do_sample=True temperature=0.6 top_p=0.95 top_k=20", r"回答（结束原因 length）"))
    if "没有生成设置" in outputs["chat"]:  # the defaults stood in: the model's own generation_config.json was not read
        raise RehearsalError(f"对话没有使用模型目录中的 generation_config.json：\n{outputs['chat'][-2000:]}")
    return {"timings": timings, "outputs": outputs, "losses": [r["loss"] for r in resumed]}


def main(argv=None) -> int:
    from llava_lib.data.cli import Parser
    p = Parser(prog="python tests/rehearsal.py",
                description="完整配置（full）的离线预演：按真实尺寸写出随机权重的 Chinese-CLIP（ModelScope 格式）、Qwen3-0.6B "
                            "和 SA1B 数据分片（图片由本机回环地址提供），再用学生的命令依次运行数据准备、训练、续训和对话。\n"
                            "只检查各环节能否接上，不代表模型效果。")
    p.add_argument("--dir", type=Path, metavar="目录", help="写在这个目录并保留（不给则用临时目录，结束后删除）；约需 3 GB")
    args = p.parse_args(argv)
    root, t0 = args.dir or Path(tempfile.mkdtemp(prefix="llava-rehearsal-")), time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill also runs `finally`: no 3 GB left behind
    try:
        result = rehearse(root)
    except RehearsalError as e:
        print(f"预演失败：{e}", file=sys.stderr)
        return 1
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print("预演通过。各步用时：\n" + "".join(f"  {s:7.1f} 秒  {t}\n" for t, s in result["timings"])
          + f"  {time.perf_counter() - t0:7.1f} 秒  合计" + ("" if args.dir is None else f"（文件保留在 {root}）"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
