"""The chat path on transformers' generate: the model's own chat settings, greedy replies against plain generate,
cut-off replies, errors and early exits of the generating thread."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from llava_lib import config
from llava_lib.chat import ChatSession, chat_generation_config
from llava_lib.model import loading
from llava_lib.widgets import TextChatWidget

from conftest import tiny_llava

QUESTION = "请描述一个简单的场景。"
THINK, END_THINK = 151667, 151668


@pytest.fixture(scope="module")
def mini(mini_world):
    """The mini world's Qwen3 and tokenizer, text only (no vision tower)."""
    model, tok = loading.build_model(config.resolve("mini"), device="cpu", with_vision=False)
    return model, tok


def _spy_generate(monkeypatch, llm) -> list:
    """Record the GenerationConfig every ``llm.generate`` call gets."""
    seen, real = [], llm.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["generation_config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(llm, "generate", spy)
    return seen


def test_greedy_reply_equals_plain_generate_on_the_templated_prompt(mini):
    """The chat path (prompt from the session, its live-rows head) against transformers' generate on the
    tokenizer's own template, with the LM loaded afresh (the full head product)."""
    model, tok = mini
    session = ChatSession(model, tok, generation={"do_sample": False, "max_new_tokens": 60})
    reply = session.ask(QUESTION)
    enc = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  enable_thinking=False, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    llm = loading.load_llm(config.resolve("mini").llm_path, torch.device("cpu"))
    out = llm.generate(**enc, do_sample=False, max_new_tokens=60)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert reply == expected and "图" in reply
    assert session.finish_reason == "eos" and out[0, -1] in (151645, 151643)


def test_live_rows_head_gives_the_full_products_logits(mini):
    """The mini LM's head multiplies only its live rows: bit for bit the full product, for any hidden state."""
    from llava_lib.mini.loss import live_rows_head
    model, _ = mini
    head = model.llm.lm_head
    live_rows_head(head)
    assert "forward" in vars(head)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, head.weight.shape[1], generator=g) * 4
    with torch.no_grad():
        fast, full = head(hidden), torch.nn.functional.linear(hidden, head.weight)
    assert torch.equal(fast, full) and int((head.weight != 0).any(dim=1).sum()) < head.weight.shape[0] // 100


def test_chat_uses_the_models_sampling_settings_per_mode(mini, monkeypatch):
    """Qwen3's model card: thinking 0.6 / 0.95 / 20, non-thinking 0.7 / 0.8 / 20, sampled in both; room to think."""
    model, tok = mini
    seen = _spy_generate(monkeypatch, model.llm)
    ChatSession(model, tok, enable_thinking=True, seed=0).ask(QUESTION)
    ChatSession(model, tok, seed=0).ask(QUESTION)
    ChatSession(model, tok, generation={"max_new_tokens": 7, "top_k": 5}, seed=0).ask(QUESTION)
    picked = [(c.do_sample, c.temperature, c.top_p, c.top_k) for c in seen]
    assert picked == [(True, 0.6, 0.95, 20), (True, 0.7, 0.8, 20), (True, 0.7, 0.8, 5)]
    assert seen[0].max_new_tokens >= 1024 and seen[1].max_new_tokens < seen[0].max_new_tokens
    assert seen[2].max_new_tokens == 7
    assert list(seen[0].eos_token_id) == [151645, 151643] and seen[0].pad_token_id == 151643


def test_thinking_sampling_comes_from_the_models_generation_config(qwen_tokenizer, tmp_path, capsys):
    """A directory with its own generation_config.json is followed; one without gets Qwen3's defaults, said once."""
    llm = tiny_llava(qwen_tokenizer).llm
    llm.generation_config.update(do_sample=True, temperature=0.5, top_p=0.9, top_k=7)
    llm.save_pretrained(tmp_path / "own")
    own = loading.load_llm(tmp_path / "own", torch.device("cpu"))
    cfg = chat_generation_config(own, enable_thinking=True)
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (0.5, 0.9, 7)
    assert chat_generation_config(own, enable_thinking=False).temperature == 0.7  # not in the file: the model card

    shutil.copytree(tmp_path / "own", tmp_path / "bare")
    (tmp_path / "bare" / "generation_config.json").unlink()
    capsys.readouterr()
    bare = loading.load_llm(tmp_path / "bare", torch.device("cpu"))
    loading.load_llm(tmp_path / "bare", torch.device("cpu"))
    said = [line for line in capsys.readouterr().out.splitlines() if "generation_config.json" in line]
    assert len(said) == 1 and "Qwen3" in said[0] and str(tmp_path / "bare") in said[0]
    g = bare.generation_config
    assert (g.do_sample, g.temperature, g.top_p, g.top_k) == (True, 0.6, 0.95, 20)
    assert list(g.eos_token_id) == [151645, 151643] and g.pad_token_id == 151643 and g.bos_token_id == 151643


def test_mini_builder_writes_qwen3_generation_config(mini_world):
    """What the chat path reads from the mini LM's directory (written by the builder)."""
    root, _ = mini_world
    path = root / "llm" / "generation_config.json"
    if "do_sample" not in json.loads(path.read_text(encoding="utf-8")):
        pytest.skip("这个迷你世界是旧的构建器生成的（generation_config.json 里没有采样设置）")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert {k: saved[k] for k in ("do_sample", "temperature", "top_p", "top_k", "bos_token_id", "pad_token_id")} == \
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "bos_token_id": 151643,
         "pad_token_id": 151643}
    assert saved["eos_token_id"] == [151645, 151643]


def test_reply_cut_off_inside_thinking_leaves_no_open_think_block(mini):
    model, tok = mini
    session = ChatSession(model, tok, enable_thinking=True, generation={"do_sample": False, "max_new_tokens": 6})
    w = TextChatWidget(session)
    w.question.value = QUESTION
    assert w.send() and w.wait(30)
    assert w.last_reply.startswith("<think>") and "</think>" not in w.last_reply
    assert session.finish_reason == "length"
    assert w.history[-1] == {"role": "assistant", "content": ""}
    assert "<think>" not in tok.decode(session.prompt_ids("再说一遍。"))
    assert "思考被截断" in w.history_html and "思考被截断" in w.status

    session.generation = {"do_sample": False, "max_new_tokens": 200}  # room for the think block and the answer
    reply = session.ask(QUESTION)
    assert "</think>" in reply and session.history[-1]["content"] == reply and session.finish_reason == "eos"


def test_error_in_the_generating_thread_is_raised_to_the_reader(qwen_tokenizer):
    model = tiny_llava(qwen_tokenizer)
    calls = []

    def fail_on_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("显存不足（测试）")

    model.llm.register_forward_pre_hook(fail_on_third)
    session = ChatSession(model, qwen_tokenizer, generation={"do_sample": False, "max_new_tokens": 20})
    with pytest.raises(RuntimeError, match="显存不足"):
        list(session.stream("你好"))
    assert len(calls) == 3 and session.history[-2]["content"] == "你好"


def test_reader_leaving_early_stops_generation(qwen_tokenizer):
    model = tiny_llava(qwen_tokenizer)
    steps = []
    model.llm.register_forward_pre_hook(lambda module, args: steps.append(1))
    session = ChatSession(model, qwen_tokenizer, generation={"do_sample": False, "max_new_tokens": 500,
                                                             "min_new_tokens": 500})
    pieces = session.stream("你好")
    next(pieces)
    pieces.close()  # joins the generating thread
    n = len(steps)
    assert n < 500 and session.finish_reason == "stopped" and len(session.history) == 2
    assert len(steps) == n  # nothing runs after the reader left
