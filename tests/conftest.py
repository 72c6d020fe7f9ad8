"""Shared fixtures: a tiny random LLaVA (real classes, real tokenizer, tiny widths) and the built mini world."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory):
    """The real Qwen3 tokenizer, rebuilt offline once per session."""
    from llava_lib.mini.tokenizer import build_qwen_tokenizer
    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tok"))


def tiny_llava(qwen_tokenizer, projector_type="linear", feature_layer=-1, seed=0, image_size=224, patch=16):
    """Random-weight towers at tiny widths (same classes as the real run)."""
    from transformers import ChineseCLIPVisionConfig, ChineseCLIPVisionModel, Qwen3Config, Qwen3ForCausalLM

    from llava_lib.model import LlavaStage1, VisionTower
    torch.manual_seed(seed)
    vcfg = ChineseCLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=image_size, patch_size=patch)
    lcfg = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                       tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643)
    vision = VisionTower(ChineseCLIPVisionModel(vcfg).eval(), feature_layer)
    llm = Qwen3ForCausalLM(lcfg)
    llm.config._attn_implementation = "sdpa"
    return LlavaStage1(vision, llm, projector_type)


@pytest.fixture
def tiny_model(qwen_tokenizer):
    return tiny_llava(qwen_tokenizer)


@pytest.fixture(scope="session")
def mini_world():
    """The built mini world (``python -m llava_lib.mini build``; reused from its cache when present)."""
    from llava_lib import config
    from llava_lib.mini.build import build
    meta = build()
    return config.mini_root(), meta


@pytest.fixture(scope="session")
def stage1_run(mini_world, tmp_path_factory):
    """A short Stage 1 mini run (Stage 2 starts from it; exports and evaluations read it). Its ``metrics.json``
    has the caption accuracy of its first 10 held-out images; 20 are held out."""
    from llava_lib.train import TrainConfig, train
    out = tmp_path_factory.mktemp("stage1")
    train(TrainConfig.for_profile("mini", out_dir=str(out), max_steps=250, caption_eval_n=10, caption_show_n=0,
                                  eval_every=0, eval_limit=20, progress=False, tensorboard=False))
    return out


def run_single_and_ddp(common: list[str], out, port: int) -> None:
    """``llava-train`` with ``common`` flags twice: one process with ``--grad-accum 2`` into ``out/single`` and two
    DDP processes with ``--grad-accum 1`` into ``out/ddp`` (the same global batch); each must exit 0."""
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"single": [sys.executable, "-m", "llava_lib.train", *common, "--grad-accum", "2"],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    "-m", "llava_lib.train", *common, "--grad-accum", "1"]}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, "--out", str(Path(out) / name)], capture_output=True, text=True, timeout=900,
                              env=env, cwd=repo)
        assert done.returncode == 0, (name, done.stderr[-3000:])
