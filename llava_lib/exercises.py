"""Checkers for the notebooks' exercises: each prints a Chinese verdict and returns True or False, never raises.

The blank a student fills is ``None``. Where the library already computes the answer, the checker asks the library
(not a copy of the formula), so an exercise and the code it teaches cannot drift apart."""
import math

import torch

from . import process


def _blank(answer, what: str) -> bool:
    if answer is None or answer is ...:
        print(f"尚未完成：请把 None 换成{what}，再运行这个单元格。")
        return True
    return False


def _verdict(ok: bool, praise: str, hint: str) -> bool:
    print("✓ 正确！" + praise if ok else "还不对：" + hint)
    return bool(ok)


def _number(answer):
    try:
        return float(answer)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one number
        return None


def _close(answer, truth: float, rel: float = 1e-3) -> bool:
    return _number(answer) is not None and math.isclose(_number(answer), truth, rel_tol=rel, abs_tol=1e-9)


def _gb(answer, n_bytes: float) -> bool:  # GB (10^9 bytes) or GiB (2^30), within 2%
    return _close(answer, n_bytes / 1e9, 0.02) or _close(answer, n_bytes / 2**30, 0.02)


def _ints(answer) -> list[int] | None:
    try:
        return [int(i) for i in (answer.tolist() if hasattr(answer, "tolist") else answer)]
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- 00
def check_memory_gb(answer, n_params: float, bytes_per_param: int) -> bool:
    """Weights only: parameters x bytes per parameter."""
    if _blank(answer, "显存大小（单位 GB 的数字）"):
        return False
    return _verdict(_gb(answer, n_params * bytes_per_param),
                    f"{n_params:.3g} 个参数 × {bytes_per_param} 字节 ≈ {n_params * bytes_per_param / 1e9:.2f} GB。",
                    f"每个参数占 {bytes_per_param} 字节；参数量 × 字节数，再除以 10^9 就是 GB。")


def check_image_tokens(answer, image_size: int, patch_size: int) -> bool:
    if _blank(answer, "图片词元的个数"):
        return False
    truth = process.num_image_tokens(image_size, patch_size)
    side = image_size // patch_size
    return _verdict(_number(answer) == truth, f"1 个 CLS + {side}×{side} 个图块 = {truth}。",
                    f"每边有 {image_size} ÷ {patch_size} 个图块；别忘了再加 1 个 CLS。")


# ------------------------------------------------------------------------------------------------- 01
def check_count_im_start(answer, tokenizer, messages, add_generation_prompt: bool = True) -> bool:
    if _blank(answer, "<|im_start|> 出现的次数"):
        return False
    text = process.render_chat(tokenizer, messages, 0, add_generation_prompt=add_generation_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truth = ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    return _verdict(_number(answer) == truth, f"每条消息一个 <|im_start|>，生成提示再加一个：共 {truth} 个。",
                    "每条消息（包括 system）都以 <|im_start|> 开头；add_generation_prompt=True 还会在末尾多加一个。")


def check_end_of_turn(answer, tokenizer) -> bool:
    """The token right after an assistant turn's content, read off the rendered template."""
    if _blank(answer, "一个词元（字符串，例如 \"<|xxx|>\"）"):
        return False
    text = process.render_chat(tokenizer, [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}], 0)
    after = tokenizer(text.rsplit("答", 1)[1], add_special_tokens=False)["input_ids"][0]
    truth = tokenizer.convert_ids_to_tokens(after)
    ok = answer == truth or (isinstance(answer, int) and answer == after)
    return _verdict(ok, f"助手的回答以 {truth}（id {after}）结束；生成时模型写出它就停下。",
                    "看看 render_chat 的输出：助手那一轮的内容后面紧跟着哪个特殊词元？")


# ------------------------------------------------------------------------------------------------- 02
def check_top_k(answer, scores, k: int = 5) -> bool:
    from .retrieval import top_k
    if _blank(answer, f"得分最高的 {k} 个下标（列表）"):
        return False
    truth = [m.index for m in top_k(scores, k)]
    got = _ints(answer)
    if got is not None and sorted(got) == sorted(truth) and got != truth:
        return _verdict(False, "", "下标对了，但顺序不对：要从得分最高的排起（降序）。")
    return _verdict(got == truth, f"Top-{k} 的下标是 {truth}，和 retrieval.top_k 一致。",
                    f"对 scores 做降序排序（argsort），取前 {k} 个下标。")


def check_cosine(answer, a, b) -> bool:
    from .retrieval import cosine_similarities
    if _blank(answer, "余弦相似度（一个数）"):
        return False
    truth = float(cosine_similarities(torch.as_tensor(a)[None], torch.as_tensor(b)[None])[0, 0])
    return _verdict(_number(answer) is not None and abs(_number(answer) - truth) < 1e-4,
                    f"余弦相似度 = {truth:.4f}；单位向量的点积就是它。",
                    "余弦相似度 = 点积 ÷ (两个长度的乘积)；对单位向量，分母是 1。")


# ------------------------------------------------------------------------------------------------- 03
def check_cap_seg(answer, raw) -> bool:
    from .data.reader import parse_cap_seg
    if _blank(answer, "解析出的整体描述（字符串）"):
        return False
    truth = parse_cap_seg(raw)
    ok = isinstance(answer, str) and answer.strip() == truth
    return _verdict(ok, f"整体描述是：{truth}",
                    "先把字符串解析成字典（JSON 用 json.loads，Python 字面量用 ast.literal_eval），再取 'global_caption'。")


# ------------------------------------------------------------------------------------------------- 04
def check_label_positions(answer, tokenizer, messages, n_image_tokens: int = 0) -> bool:
    """Positions (or a same-length list of booleans) of the tokens that carry loss."""
    if _blank(answer, "带损失的位置（下标列表，或与词元等长的 True/False 列表）"):
        return False
    _, labels = process.encode_conversation(tokenizer, messages, n_image_tokens)
    truth = [i for i, y in enumerate(labels) if y != process.IGNORE_INDEX]
    got = list(answer.tolist() if hasattr(answer, "tolist") else answer)
    if got and all(isinstance(x, bool) for x in got):
        got = [i for i, x in enumerate(got) if x] if len(got) == len(labels) else None
    else:
        got = _ints(got)
    hint = ("结尾的 <|im_end|> 也要学：模型得学会在哪里停下。" if got and truth and got[-1] == truth[-1] - 1
            else "只有助手回答的内容和它结尾的 <|im_end|> 带损失；“assistant\\n”和空的思考块不算。")
    return _verdict(got == truth, f"带损失的位置是 {truth[0]}…{truth[-1]}，共 {len(truth)} 个。", hint)


def check_splice(answer, model, input_ids, pixel_values, b: int = 0) -> bool:
    if _blank(answer, f"第 {b} 条样本拼接后的词向量（[T, D] 张量）"):
        return False
    with torch.no_grad():
        truth = model.embed(input_ids, pixel_values)[b]
    answer = torch.as_tensor(answer).detach()
    if tuple(answer.shape) != tuple(truth.shape):
        return _verdict(False, "", f"形状应是 {tuple(truth.shape)}（一条样本：[T, D_LLM]），现在是 {tuple(answer.shape)}。")
    ok = torch.allclose(answer.float(), truth.float(), atol=1e-5)
    return _verdict(ok, "和 LlavaStage1.embed 的结果一致。",
                    f"第 {b} 条样本的槽位要按顺序放第 {b} 张图的特征（用当前的投影层重新算），其余位置是词向量。")


def check_lr_schedule(fn, total: int, cfg) -> bool:
    """Compare a student's schedule with ``train.lr_at`` at the steps where mistakes show: warmup edges, middle, end."""
    from .train import lr_at
    try:  # a function that still returns None is a blank too
        first = None if fn is None or fn is ... else fn(0, total, cfg)
    except Exception:
        first = 0.0  # reported with its message below
    if _blank(first, "学习率（让 my_lr_at 返回它，而不是 None）"):
        return False
    warm = max(1, math.ceil(cfg.warmup_ratio * total))
    for step in sorted({0, warm - 1, warm, (warm + total) // 2, total - 1}):
        try:
            got = fn(step, total, cfg)
        except Exception as e:  # a student's bug is a hint, not a traceback
            return _verdict(False, "", f"调用 my_lr_at({step}, {total}, cfg) 出错：{type(e).__name__}: {e}")
        truth = lr_at(step, total, cfg)
        if not _close(got, truth, 1e-6):
            part = "预热" if step < warm else "余弦下降"
            return _verdict(False, "", f"第 {step} 步（{part}阶段）应是 {truth:.3g}，你的是 {got}。")
    return _verdict(True, f"预热 {warm} 步再余弦下降，和 train.lr_at 一致。", "")


# ------------------------------------------------------------------------------------------------- 05
def check_image_messages(answer) -> bool:
    if _blank(answer, "消息列表（每条是 {\"role\": ..., \"content\": ...}）"):
        return False
    try:
        roles = [m["role"] for m in answer]
        contents = [m["content"] for m in answer]
    except (TypeError, KeyError):
        return _verdict(False, "", "每条消息应是一个字典，含 \"role\" 和 \"content\"。")
    markers = [c.count(process.IMAGE_MARKER) for c in contents]
    first_user = roles.index("user") if "user" in roles else None
    if sum(markers) != 1 or first_user is None or markers[first_user] != 1:
        return _verdict(False, "", f"{process.IMAGE_MARKER} 只能出现一次，而且在第一个用户轮次里。")
    turns = [r for r in roles if r != "system"]
    ok = len(turns) >= 3 and turns[-1] == "user" and all(r == ("user", "assistant")[i % 2] for i, r in enumerate(turns))
    return _verdict(ok, "图片只在第一轮，之后的轮次只有文字。",
                    "用户和助手应轮流说话（用户先），最后一条是用户的新问题。")


def check_image_block_tokens(answer, tokenizer, n_image_tokens: int) -> bool:
    if _blank(answer, "图片块的词元个数"):
        return False
    truth = len(tokenizer(process.image_block(n_image_tokens), add_special_tokens=False)["input_ids"])
    return _verdict(_number(answer) == truth, f"<|vision_start|> + {n_image_tokens} 个 <|image_pad|> + <|vision_end|> = {truth}。",
                    "图片块除了占位词元，前后还各有一个特殊词元。")


# ------------------------------------------------------------------------------------------------- 06
def check_training_memory_gb(answer, n_trainable: float) -> bool:
    """fp32 weights + gradients + AdamW's two moments: 16 bytes per trainable parameter."""
    if _blank(answer, "训练时权重、梯度和优化器状态一共占的显存（单位 GB 的数字）"):
        return False
    if _gb(answer, n_trainable * 4):
        return _verdict(False, "", "这只是权重本身（4 字节/参数）；训练时还有同样大小的梯度，以及 AdamW 的两份状态（一阶、二阶矩）。")
    return _verdict(_gb(answer, n_trainable * 16),
                    f"{n_trainable:,.0f} 个参数 × 16 字节（权重 4 + 梯度 4 + AdamW 两份状态 8）"
                    f"≈ {n_trainable * 16 / 1e9:.1f} GB，还没算激活值。",
                    "fp32 的权重、梯度各 4 字节，AdamW 为每个参数再存两份 4 字节的状态：一共 16 字节/参数。")
