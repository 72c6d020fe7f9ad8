"""The exercise checkers accept the right answer (computed here, not by the checker), reject a wrong one with a hint,
and say "尚未完成" for the blank; every notebook's exercises are wired to a checker and have solutions."""
from __future__ import annotations

import math
from pathlib import Path

import nbformat
import pytest
import torch

from llava_lib import exercises as ex
from llava_lib.train import TrainConfig

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
HISTORY = [{"role": "system", "content": "你是助教。"}, {"role": "user", "content": "你好"},
           {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "描述一个场景。"}]


def verdict(capsys, checker, *args, **kwargs):
    ok = checker(*args, **kwargs)
    return ok, capsys.readouterr().out


def assert_right(capsys, checker, *args, **kwargs):
    ok, out = verdict(capsys, checker, *args, **kwargs)
    assert ok is True and out.startswith("✓ 正确！"), out


def assert_wrong(capsys, checker, *args, **kwargs):
    ok, out = verdict(capsys, checker, *args, **kwargs)
    assert ok is False and "✓" not in out and "尚未完成" not in out and out.strip(), out


def test_memory_and_image_tokens(capsys):
    assert_right(capsys, ex.check_memory_gb, 1.2, n_params=0.6e9, bytes_per_param=2)
    assert_right(capsys, ex.check_memory_gb, 0.6e9 * 2 / 2**30, n_params=0.6e9, bytes_per_param=2)  # GiB
    assert_wrong(capsys, ex.check_memory_gb, 2.4, n_params=0.6e9, bytes_per_param=2)
    assert_right(capsys, ex.check_image_tokens, 577, image_size=336, patch_size=14)
    assert_wrong(capsys, ex.check_image_tokens, 576, image_size=336, patch_size=14)
    assert_wrong(capsys, ex.check_image_tokens, "很多", image_size=336, patch_size=14)


def test_chat_template(capsys, qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
    assert_right(capsys, ex.check_count_im_start, text.count("<|im_start|>"), qwen_tokenizer, HISTORY)
    assert_right(capsys, ex.check_count_im_start, 5, qwen_tokenizer, HISTORY)
    assert_wrong(capsys, ex.check_count_im_start, 4, qwen_tokenizer, HISTORY)
    assert_right(capsys, ex.check_end_of_turn, "<|im_end|>", qwen_tokenizer)
    assert_right(capsys, ex.check_end_of_turn, qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"), qwen_tokenizer)
    assert_wrong(capsys, ex.check_end_of_turn, "<|endoftext|>", qwen_tokenizer)


def test_retrieval(capsys):
    scores = torch.tensor([0.1, 0.9, 0.3, 0.9, 0.5])
    assert_right(capsys, ex.check_top_k, [1, 3, 4], scores, k=3)           # ties: the lower index first
    assert_right(capsys, ex.check_top_k, torch.tensor([1, 3, 4]), scores, k=3)
    assert_wrong(capsys, ex.check_top_k, [4, 3, 1], scores, k=3)           # ascending order
    assert_wrong(capsys, ex.check_top_k, [1, 3, 2], scores, k=3)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    assert_right(capsys, ex.check_cosine, 0.6, a, b)
    assert_wrong(capsys, ex.check_cosine, 0.8, a, b)
    assert_wrong(capsys, ex.check_cosine, torch.tensor([0.6, 0.6]), a, b)  # not one number


def test_cap_seg(capsys):
    raw_json = '{"global_caption": "一个红色的圆形。", "local_caption": ["圆形"]}'
    raw_literal = "{'global_caption': '一只猫。', 'local_caption': []}"
    assert_right(capsys, ex.check_cap_seg, "一个红色的圆形。", raw_json)
    assert_right(capsys, ex.check_cap_seg, "一只猫。", raw_literal)
    assert_wrong(capsys, ex.check_cap_seg, "圆形", raw_json)
    assert_wrong(capsys, ex.check_cap_seg, {"global_caption": "一只猫。"}, raw_literal)


def test_label_positions(capsys, qwen_tokenizer):
    answer = "图中有一个红色的圆形。"
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": answer}]
    ids = qwen_tokenizer(qwen_tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    end = len(ids) - 1 - ids[::-1].index(qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    content = qwen_tokenizer(answer, add_special_tokens=False)["input_ids"]
    start = end - len(content)
    assert ids[start:end] == content
    right = list(range(start, end + 1))                                   # the answer and its <|im_end|>
    assert_right(capsys, ex.check_label_positions, right, qwen_tokenizer, conv)
    assert_right(capsys, ex.check_label_positions, [i in right for i in range(len(ids))], qwen_tokenizer, conv)
    ok, out = verdict(capsys, ex.check_label_positions, right[:-1], qwen_tokenizer, conv)
    assert not ok and "<|im_end|>" in out                                  # the specific hint
    assert_wrong(capsys, ex.check_label_positions, list(range(start - 3, end + 1)), qwen_tokenizer, conv)


def test_splice(capsys, tiny_model):
    n = tiny_model.num_image_tokens
    ids = torch.tensor([[1, 2] + [tiny_model.image_token_id] * n + [3]] * 2)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        proj = tiny_model.projector(tiny_model.vision(pixels))
        right = tiny_model.llm.get_input_embeddings()(ids[1]).clone()
        right[2:2 + n] = proj[1]
        wrong = right.clone()
        wrong[2:2 + n] = proj[0]                                           # the other image's features
    assert_right(capsys, ex.check_splice, right, tiny_model, ids, pixels, b=1)
    assert_wrong(capsys, ex.check_splice, wrong, tiny_model, ids, pixels, b=1)
    assert_wrong(capsys, ex.check_splice, right[None], tiny_model, ids, pixels, b=1)  # shape


def test_lr_schedule(capsys):
    cfg = TrainConfig.for_profile("full")
    total = 6250

    def right(step, total, cfg):
        warm = max(1, math.ceil(cfg.warmup_ratio * total))
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def no_warmup(step, total, cfg):
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / total)))

    def broken(step, total, cfg):
        raise ZeroDivisionError("division by zero")

    assert_right(capsys, ex.check_lr_schedule, right, total, cfg)
    assert_wrong(capsys, ex.check_lr_schedule, no_warmup, total, cfg)
    ok, out = verdict(capsys, ex.check_lr_schedule, broken, total, cfg)
    assert not ok and "ZeroDivisionError" in out
    ok, out = verdict(capsys, ex.check_lr_schedule, lambda step, total, cfg: None, total, cfg)
    assert not ok and out.startswith("尚未完成")


def test_image_messages_and_block(capsys, qwen_tokenizer):
    good = [{"role": "user", "content": "<image>\n请描述这张图片。"}, {"role": "assistant", "content": "一个圆形。"},
            {"role": "user", "content": "图中有几个物体？"}]
    assert_right(capsys, ex.check_image_messages, good)
    assert_wrong(capsys, ex.check_image_messages, [good[0], good[1], {**good[2], "content": "<image>\n几个？"}])
    assert_wrong(capsys, ex.check_image_messages, [{**good[0], "content": "请描述。"}, good[1],
                                                   {**good[2], "content": "<image>几个？"}])
    assert_wrong(capsys, ex.check_image_messages, good[:2])                # the new question is missing
    assert_wrong(capsys, ex.check_image_messages, ["<image>", "你好"])
    assert_right(capsys, ex.check_image_block_tokens, 197 + 2, qwen_tokenizer, 197)
    assert_right(capsys, ex.check_image_block_tokens, 50 + 2, qwen_tokenizer, 50)
    assert_wrong(capsys, ex.check_image_block_tokens, 197, qwen_tokenizer, 197)


BLANK_CASES = [
    ("check_memory_gb", (0.6e9, 2)), ("check_image_tokens", (336, 14)), ("check_top_k", ([0.1, 0.2],)),
    ("check_cosine", ([1.0], [1.0])), ("check_cap_seg", ('{"global_caption": "x"}',)),
    ("check_splice", (None, None, None)), ("check_lr_schedule", (10, None)), ("check_image_messages", ()),
    ("check_image_block_tokens", (None, 197)), ("check_end_of_turn", (None,)), ("check_count_im_start", (None, [])),
    ("check_label_positions", (None, [])), ("check_training_memory_gb", (6e8,)),
]


def test_training_memory(capsys):
    n = 596_049_920
    assert_right(capsys, ex.check_training_memory_gb, n * 16 / 1e9, n)
    assert_right(capsys, ex.check_training_memory_gb, n * 16 / 2**30, n)
    ok, out = verdict(capsys, ex.check_training_memory_gb, n * 4 / 1e9, n)   # weights only
    assert ok is False and "梯度" in out
    assert_wrong(capsys, ex.check_training_memory_gb, n * 8 / 1e9, n)


@pytest.mark.parametrize("name,args", BLANK_CASES)
@pytest.mark.parametrize("blank", [None, ...])
def test_blank_is_not_done_yet(capsys, name, args, blank):
    ok, out = verdict(capsys, getattr(ex, name), blank, *args)
    assert ok is False and out.startswith("尚未完成")


def _cells(path):
    return nbformat.read(path, as_version=4).cells


def _checkers():
    return [n for n in dir(ex) if n.startswith("check_")]


def test_every_checker_has_a_blank_test():
    assert set(_checkers()) == {name for name, _ in BLANK_CASES}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_exercises_are_checked(path):
    cells = _cells(path)
    at = [i for i, c in enumerate(cells) if "exercise" in c.metadata.get("tags", [])]
    assert 1 <= len(at) <= 3, f"{path.name}：每个笔记本应有 1-3 个练习，现在 {len(at)} 个"
    for i in at:
        ex_cell, check = cells[i], cells[i + 1]
        assert ex_cell.cell_type == "code" and "None" in ex_cell.source, ex_cell.source   # the blank is None
        assert check.cell_type == "code" and "from llava_lib.exercises import check_" in check.source
        called = [n for n in _checkers() if f"{n}(" in check.source]
        assert called, check.source
        for c in (ex_cell, check):
            assert "nbval-check-output" not in c.metadata.get("tags", []) and "NBVAL_CHECK_OUTPUT" not in c.source


def test_enough_exercises_and_a_solution_for_each():
    with_ex = [p for p in sorted(NOTEBOOKS.glob("*.ipynb"))
               if any("exercise" in c.metadata.get("tags", []) for c in _cells(p))]
    total = sum("exercise" in c.metadata.get("tags", []) for p in with_ex for c in _cells(p))
    assert total >= 10
    for p in with_ex:
        sol = NOTEBOOKS / "solutions" / f"{p.stem}_solutions.ipynb"
        assert sol.exists(), f"缺少参考答案 {sol.name}"
        n_ex = sum("exercise" in c.metadata.get("tags", []) for c in _cells(p))
        asserted = [c for c in _cells(sol) if c.cell_type == "code" and "assert check_" in c.source]
        assert len(asserted) == n_ex, f"{sol.name}：每个练习一个断言答案正确的检查单元格"


@pytest.mark.parametrize("path", sorted((NOTEBOOKS / "solutions").glob("*.ipynb")), ids=lambda p: p.stem)
def test_solutions_are_clean(path):
    from llava_lib import nbtools
    assert nbtools.dirty_cells(nbformat.read(path, as_version=4)) == []
