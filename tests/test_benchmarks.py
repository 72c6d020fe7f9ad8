"""The GPU benchmarks in their CI size (so they cannot rot), and the exactness of the fast training paths they measure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common as C  # noqa: E402

from llava_lib.model import accel  # noqa: E402
from llava_lib.model.llava import is_right_padded, lean_causal_lm_loss  # noqa: E402

from conftest import tiny_llava  # noqa: E402


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def cached_tokenizer(qwen_tokenizer):
    """The benchmarks' --mini tokenizer check reads the tokenizer from the cache; put the session's one there."""
    from llava_lib import config
    d = config.llava_home() / "bench" / "qwen_tokenizer"
    if not (d / "tokenizer.json").exists():
        qwen_tokenizer.save_pretrained(str(d))
    return d


def _run(script: str, json_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--mini", "--json", str(json_path), *extra],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_written_out_chat_ids_are_the_tokenizers(qwen_tokenizer):
    assert C.check_prompt_ids(qwen_tokenizer) == {"train_sample_matches": True, "generation_prompt_matches": True,
                                                  "pad_id_matches": True}


@pytest.mark.slow
def test_benchmarks_import_nothing_gpu_machine_lacks():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import train_step, generate, stage2_step; "
            "bad = [m for m in ('modelscope', 'dashscope', 'llava_lib.data', 'llava_lib.mini') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_train_step_benchmark_mini(tmp_path, cached_tokenizer):
    out = tmp_path / "train_step.json"
    r = _run("train_step.py", out, "--budget-s", "200")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ratio b/a:" in r.stdout
    d = json.loads(out.read_text(encoding="utf-8"))
    checks = d["checks"]
    assert all(checks["prompt_ids"].values())
    for name in ("L0_train_before", "L2_train_default", "L3_fused_loss"):   # the equality checks really ran
        assert checks[name]["ok"] and checks[name]["rel_diff"] < 1e-4, checks[name]
    assert d["checks_passed"] and not d["errors"]
    assert d["results"]["textbook"]["samples_per_s"] > 0
    assert d["ratio_b_over_a"] is not None and d["ratio_b_over_a"] > 0
    assert d["table"] and d["flop_formula"]


@pytest.mark.slow
def test_stage2_step_benchmark_mini(tmp_path):
    """Both recipes compute the same loss on the same batch before they are timed, and both are timed."""
    out = tmp_path / "stage2_step.json"
    r = _run("stage2_step.py", out, "--batch-sizes", "2", "--steps", "1", "--warmup", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = json.loads(out.read_text(encoding="utf-8"))["rows"][0]
    assert abs(row["loss_original"] - row["loss_project"]) < 0.05 * row["loss_original"], row
    assert row["original"]["samples_per_s"] > 0 and row["project"]["samples_per_s"] > 0 and row["ratio"] > 0


@pytest.mark.slow
def test_generate_benchmark_mini(tmp_path, cached_tokenizer):
    """Three paths (transformers' dynamic cache, its static cache, the chat path), each decoding exactly the
    asked number of tokens, with sane speeds; fp32 greedy on a CPU: the same tokens on every path."""
    out = tmp_path / "generate.json"
    r = _run("generate.py", out, "--new-tokens", "24")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text(encoding="utf-8"))
    assert d["checks_passed"] and not d["errors"], d["errors"]
    rows = d["table"][2:]
    assert [row[:3] for row in rows] == ["(a)", "(b)", "(c)"] and "\n".join(d["table"]) in r.stdout
    paths = d["paths"]
    assert set(paths) == {"hf_dynamic", "hf_static", "chat"}
    for name, p in paths.items():
        assert p["n"] == 24 and p["distinct_tokens"] > 5, (name, p)
        assert 1 < p["tokens_per_s"] < 10_000 and 0 < p["ttft_s"] < p["total_s"], (name, p)
        assert p["same_tokens_as_a"] and p["same_tokens_every_run"], (name, p)
        assert abs(p["ratio_over_a"] - p["tokens_per_s"] / paths["hf_dynamic"]["tokens_per_s"]) < 1e-9
    assert d["models"]["detokenizer"] == "Qwen3" and not d["models"]["hf_static_compiled"]
    assert any("compile" in s for s in d["skipped"])


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_head_loss_equals_lean_loss(autocast):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 151936, bias=False)
    hidden = torch.randn(3, 40, 32, requires_grad=True)
    labels = torch.randint(0, 151936, (3, 40))
    labels[:, :15] = -100
    labels[2, 30:] = -100
    results = []
    for fn in (lean_causal_lm_loss, accel.fused_lean_causal_lm_loss):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(head, hidden.to(torch.bfloat16) if autocast else hidden, labels, chunk=16)
        (grad,) = torch.autograd.grad(out.loss * 2.5, hidden)
        results.append((float(out.loss), out.n_label_tokens, grad))
    (la, na, ga), (lb, nb, gb) = results
    assert na == nb == int((labels[:, 1:] != -100).sum())
    tol = 2e-2 if autocast else 1e-5
    assert abs(la - lb) <= tol * abs(la)
    assert torch.allclose(ga, gb, rtol=tol, atol=tol * float(ga.abs().max()))


def test_right_padding_detection():
    assert is_right_padded(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert not is_right_padded(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))  # left padding keeps its mask
    assert not is_right_padded(torch.tensor([[1, 0, 1, 1]]))


@pytest.mark.slow
def test_regional_compile_is_one_graph_per_tower_and_same_loss(qwen_tokenizer):
    """All decoder layers share one compiled graph (no per-layer recompiles), any batch shape reuses it, and the
    loss and the projection's gradient are the eager ones (aot_eager: the tracing and the autograd split, no codegen)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llava_lib import process
    model = tiny_llava(qwen_tokenizer)

    def batch(captions, seed):
        g = torch.Generator().manual_seed(seed)
        samples = [{"pixel_values": torch.randn(3, 224, 224, generator=g), "caption": c} for c in captions]
        return process.collate(qwen_tokenizer, samples, model.num_image_tokens, max_text_tokens=64)

    b1 = batch(["一个红色的圆形。", "左上方是一个蓝色的三角形，右下方是一个黄色的星形。"], 0)
    b2 = batch(["中间是一个绿色的方形。"] * 3, 1)
    params = list(model.projector.parameters())
    ref = model(**b1).loss
    g_ref = torch.autograd.grad(ref, params)
    torch._dynamo.reset()
    counters.clear()
    model.head_loss = accel.fused_lean_causal_lm_loss  # what train() picks on CUDA (head_loss="auto")
    accel.compile_towers(model, backend="aot_eager")
    try:
        out = model(**b1).loss
        g = torch.autograd.grad(out, params)
        model(**b2).loss.backward()
        graphs = counters["stats"]["unique_graphs"]
    finally:
        accel.uncompile_towers(model)
    assert abs(float(out) - float(ref)) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, g_ref))
    assert graphs <= 2, graphs  # one for the LLM's layers, one for the vision tower's
