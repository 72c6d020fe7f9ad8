"""The GPU benchmarks in their CI size (so they cannot rot), and the exactness of the fast paths they measure."""
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

from llava_lib.chat import GenerationConfig, _cache_kwarg, _cache_of, generate_tokens  # noqa: E402
from llava_lib.model import accel  # noqa: E402
from llava_lib.model.llava import is_right_padded, lean_causal_lm_loss  # noqa: E402

from conftest import tiny_llava  # noqa: E402


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", LLAVA_FAST_DECODE="auto")
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
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import train_step, generate; "
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
def test_generate_benchmark_mini(tmp_path):
    """The GPU run's shape on a CPU: bf16 main run, the fp32 identity check, teacher forcing, the diagnostics."""
    out = tmp_path / "generate.json"
    r = _run("generate.py", out, "--new-tokens", "48", "--dtype", "bfloat16", "--diagnose", "on", "--budget-s", "1000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ratio fast/hf:" in r.stdout
    d = json.loads(out.read_text(encoding="utf-8"))
    checks = d["checks"]
    assert d["checks_passed"] and not d["errors"], (checks, d["errors"])
    assert checks["n_tokens_forced"] and checks["distinct_tokens"] > 1
    fp32 = checks["fp32"]
    assert fp32["from"] == "fp32 run" and fp32["tokens_identical"] and fp32["hf_tokens_distinct"] >= 6
    assert fp32["forced"]["argmax_agreement"] == 1.0 and fp32["forced"]["max_abs_diff"] < 1e-3
    fast = checks["forced"]["project_fast"]
    assert fast["steps"] == 47 and fast["nonfinite_steps_other"] == 0 and fast["argmax_agreement"] >= 0.8
    exact = checks["forced"]["project_exact"]   # on a CPU the exact mode is bit for bit the plain path
    assert exact["bit_identical_steps"] == exact["steps"] == 47
    diag = d["diagnostics"]
    assert diag["reference_repeats_itself"]["bit_identical_steps"] == 47
    assert diag["without_cudnn_attention"]["exact_vs_plain"]["bit_identical_steps"] == 47
    assert diag["sdpa"]["decode_backend"]
    assert set(d["paths"]) == {"hf_generate", "project_plain", "project_fast", "project_exact"}
    assert d["ratio_fast_over_hf"] > 0 and d["table"]


# ----------------------------------------------------------------------------------------- the fast paths

def _varied_model(seed=0, dtype=torch.float32):
    """A tiny LLaVA whose greedy decoding does not collapse onto one token (larger init std)."""
    from transformers import ChineseCLIPVisionConfig, ChineseCLIPVisionModel, Qwen3Config, Qwen3ForCausalLM

    from llava_lib.model import LlavaStage1, VisionTower
    torch.manual_seed(seed)
    llm = Qwen3ForCausalLM(Qwen3Config(**dict(C.MINI_LLM, initializer_range=0.3))).eval()
    llm.config._attn_implementation = "sdpa"
    vm = ChineseCLIPVisionModel(ChineseCLIPVisionConfig(**C.MINI_VIT)).eval()
    model = LlavaStage1(VisionTower(vm.to(dtype)), llm.to(dtype))
    ids = torch.tensor([C.prompt_ids(model.num_image_tokens)])
    with torch.no_grad():
        embeds = model.embed(ids, torch.randn(1, 3, 64, 64))
    return model, embeds


def _forced(llm, embeds, tokens, dec):
    """(plain, fast) next-token logits on the same tokens, step by step."""
    plain, fast = [], []
    with torch.no_grad():
        out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        cache = _cache_of(out)
        assert dec.lock.acquire(blocking=False)
        try:
            dec.load(_cache_of(llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)))
            for tok in tokens[:-1]:
                out = llm(input_ids=torch.tensor([[tok]]), use_cache=True, **{_cache_kwarg(llm): cache})
                cache = _cache_of(out)
                plain.append(out.logits[0, -1])
                fast.append(dec.step(tok))
        finally:
            dec.lock.release()
    return torch.stack(plain), torch.stack(fast)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_mode_logits_are_bit_identical_to_the_plain_path(dtype, monkeypatch):
    monkeypatch.setenv("LLAVA_FAST_DECODE_MODE", "exact")
    model, embeds = _varied_model(dtype=dtype)
    llm = model.llm
    cfg = GenerationConfig(max_new_tokens=40)
    plain = list(generate_tokens(llm, embeds, set(), cfg, fast=False))
    fast = list(generate_tokens(llm, embeds, set(), cfg, fast=True))
    assert plain == fast and len(set(plain)) > 5
    dec = accel.cached_decoder(llm, "exact")
    assert dec is not None and dec.mode == "exact" and not dec.lock.locked() and not dec.uses_cuda_graphs
    a, b = _forced(llm, embeds, plain, dec)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_static_mode_is_the_same_function_fp32_same_tokens():
    """The default mode: attention over the whole static cache with a length mask. fp32: the plain path's greedy
    tokens, logits equal to rounding."""
    model, embeds = _varied_model(seed=3)
    llm = model.llm
    cfg = GenerationConfig(max_new_tokens=40)
    plain = list(generate_tokens(llm, embeds, set(), cfg, fast=False))
    fast = list(generate_tokens(llm, embeds, set(), cfg, fast=True))
    assert plain == fast and len(set(plain)) > 5
    dec = accel.cached_decoder(llm)
    assert dec is not None and dec.mode == "static"
    a, b = _forced(llm, embeds, plain, dec)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


@pytest.mark.slow
def test_static_mode_bf16_agrees_to_bf16_precision():
    """bf16: another kernel order, so not bit for bit; the same greedy token almost everywhere, all finite."""
    model, embeds = _varied_model(seed=4, dtype=torch.bfloat16)
    llm = model.llm
    plain = list(generate_tokens(llm, embeds, set(), GenerationConfig(max_new_tokens=40), fast=False))
    a, b = _forced(llm, embeds, plain, accel.FastDecoder(llm, 256))
    assert bool(torch.isfinite(b).all())
    agree = float((a.float().argmax(1) == b.float().argmax(1)).float().mean())
    assert agree >= 0.8, agree
    assert float((a.float() - b.float()).abs().max()) <= 0.1 * float(a.float().abs().max())


@pytest.mark.slow
def test_compiled_static_layer_is_one_graph_for_all_layers():
    """The GPU default compiles the decoder layer: every layer shares one graph (its weights are graph inputs), and
    the compiled step is the same function (aot_eager here: the tracing, not inductor's code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    model, embeds = _varied_model(seed=6)
    llm = model.llm
    plain = list(generate_tokens(llm, embeds, set(), GenerationConfig(max_new_tokens=20), fast=False))
    torch._dynamo.reset()
    counters.clear()
    accel._COMPILED_LAYER.clear()
    try:
        dec = accel.FastDecoder(llm, 256, compile=True, compile_backend="aot_eager")
        assert dec.compiled and dec.compile_info["ok"], dec.compile_info
        a, b = _forced(llm, embeds, plain, dec)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        accel._COMPILED_LAYER.clear()
        torch._dynamo.reset()
    assert graphs == 1, graphs
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


@pytest.mark.slow
def test_bf16_agreement_check_catches_a_wrong_mask():
    """The benchmark's bf16 criteria (agreement, mean |diff|) are not vacuous: a decoder whose mask hides the
    current token fails them, the real one passes."""
    import generate as G
    model, embeds = _varied_model(seed=4, dtype=torch.bfloat16)
    llm = model.llm
    plain = list(generate_tokens(llm, embeds, set(), GenerationConfig(max_new_tokens=40), fast=False))

    def verdict(dec):
        c = G.compare(*_forced(llm, embeds, plain, dec))
        return c["argmax_agreement"] >= 0.75 and c["mean_abs_diff"] <= 0.02 * c["logit_scale"]

    assert verdict(accel.FastDecoder(llm, 256))
    broken = accel.FastDecoder(llm, 256)
    broken._length_mask = lambda: torch.where(broken._positions < broken.pos_ids.view(1, 1, 1, 1),
                                              broken._zero, broken._ninf)
    assert not verdict(broken)


@pytest.mark.slow
def test_static_decoder_reused_after_a_longer_context_and_rebuilt_for_a_new_dtype():
    """A reused decoder holds the previous reply's K/V after the new prefix: masked and zeroed, it cannot leak.
    A model converted to another dtype gets a new decoder."""
    model, embeds = _varied_model(seed=5)
    llm = model.llm
    long_cfg, short_cfg = GenerationConfig(max_new_tokens=60), GenerationConfig(max_new_tokens=20)
    short_embeds = embeds[:, : embeds.shape[1] // 2]
    fresh = list(generate_tokens(llm, short_embeds, set(), short_cfg, fast=False))
    list(generate_tokens(llm, embeds, set(), long_cfg, fast=True))
    first = accel.cached_decoder(llm)
    assert list(generate_tokens(llm, short_embeds, set(), short_cfg, fast=True)) == fresh
    assert accel.cached_decoder(llm) is first            # reused, not rebuilt
    llm.to(torch.float64)
    list(generate_tokens(llm, short_embeds.double(), set(), short_cfg, fast=True))
    again = accel.cached_decoder(llm)
    assert again is not first and again.dtype == torch.float64


def test_fast_decoding_is_off_on_cpu_by_default_and_releases_its_lock(monkeypatch):
    model, embeds = _varied_model(seed=1)
    monkeypatch.delenv("LLAVA_FAST_DECODE", raising=False)
    assert not accel.fast_decode_wanted(model.llm)
    monkeypatch.setenv("LLAVA_FAST_DECODE", "1")
    assert accel.fast_decode_wanted(model.llm)
    gen = generate_tokens(model.llm, embeds, set(), GenerationConfig(max_new_tokens=30))
    first = [next(gen) for _ in range(5)]
    dec = accel.cached_decoder(model.llm)
    assert dec is not None and dec.lock.locked()
    gen.close()  # the consumer stops early (a stop button): the decoder is free again
    assert not dec.lock.locked()
    again = list(generate_tokens(model.llm, embeds, set(), GenerationConfig(max_new_tokens=5)))
    assert again == first


def test_unsupported_models_fall_back_to_the_plain_path():
    model, embeds = _varied_model(seed=2)
    model.llm.config.model_type = "llama"
    assert accel.unsupported_reason(model.llm)
    assert accel.acquire_decoder(model.llm, 100, fast=True) is None
    assert len(list(generate_tokens(model.llm, embeds, set(), GenerationConfig(max_new_tokens=4), fast=True))) == 4


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
