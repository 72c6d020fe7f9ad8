"""The rebuilt Qwen3 tokenizer must be the real one (ids, flags, pipeline, chat template); the mini BERT tokenizer
must be a char-level Chinese-CLIP-style WordPiece. Expected values are written from Qwen3-0.6B's published
tokenizer_config.json / tokenizer.json / merges.txt and from the BPE ranks in dashscope's qwen.tiktoken."""
from __future__ import annotations

import json
import random
import unicodedata

import pytest
from transformers import AutoTokenizer, BertTokenizerFast

from llava_lib.mini import tokenizer as T

# Qwen3-0.6B tokenizer_config.json, "added_tokens_decoder": id -> (content, special)
PUBLISHED_ADDED = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
    151665: ("<tool_response>", False),
    151666: ("</tool_response>", False),
    151667: ("<think>", False),
    151668: ("</think>", False),
}
# The first lines of Qwen2/Qwen3's merges.txt (151,387 merges in all).
PUBLISHED_FIRST_MERGES = [
    "Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r", "ĠĠ Ġ", "o n", "Ġ a", "r e", "a t", "s t", "e n", "o r", "Ġt h",
    "Ċ Ċ", "Ġ c", "l e", "Ġ s", "i t", "a n", "a r", "a l", "Ġth e", "; Ċ", "Ġ p", "Ġ f", "o u", "Ġ =", "i s",
]
PUBLISHED_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ROUND_TRIP = [
    "图中有两个物体：左上方是一个红色的圆形，中间是一个蓝色的正方形。",
    "请用一句话描述这张图片。",
    "Qwen3-0.6B 把 ViT-B/16 的 197 个视觉 token 当作输入，batch=16，lr=1e-3。",
    "第一行\n第二行\n\n\t缩进的第三行   结尾有空格  ",
    "emoji 😀🎉👍🏽 和 ü é ñ ß 混排；数字 0123456789 与 3.1415926",
    "  leading spaces, trailing newline\r\n",
    "def f(x):\n    return x ** 2  # 平方\n",
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen_tok")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return T.build_qwen_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def ranks():
    return T.load_qwen_bpe_ranks()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------- Qwen: ids
def test_added_tokens_have_the_published_ids_and_flags(qwen):
    for token_id, (content, special) in PUBLISHED_ADDED.items():
        assert qwen.convert_tokens_to_ids(content) == token_id, content
        assert qwen.convert_ids_to_tokens(token_id) == content
        added = qwen.added_tokens_decoder[token_id]
        assert (added.content, added.special, added.normalized) == (content, special, False)
    assert len(qwen.added_tokens_decoder) == 26


def test_module_constants_are_the_published_ids():
    assert {T.QWEN3_ADDED_TOKEN_IDS[c]: (c, s) for c, s in T.QWEN3_ADDED_TOKENS} == PUBLISHED_ADDED


def test_eos_pad_bos_and_config_match_qwen3(qwen, qwen_dir):
    assert (qwen.eos_token, qwen.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen.pad_token, qwen.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen.bos_token is None and qwen.unk_token is None
    assert qwen.model_max_length == 131072
    assert qwen.clean_up_tokenization_spaces is False
    assert type(qwen).__name__ == "Qwen2Tokenizer"  # the class Qwen3-0.6B's tokenizer_config.json names
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert set(qwen.all_special_tokens) == {c for c, s in PUBLISHED_ADDED.values() if s}


def test_sizes(qwen):
    assert qwen.vocab_size == 151643
    assert len(qwen) == 151643 + 26 == 151669


def test_reloads_offline_from_the_folder(qwen, qwen_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)
    text = "<|im_start|>user\n你好<|im_end|>\n" + ROUND_TRIP[2]
    assert ids(again, text) == ids(qwen, text)
    assert again.chat_template == T.QWEN3_CHAT_TEMPLATE


# ------------------------------------------------------------------------------------------------ Qwen: the BPE
def test_saved_pipeline_is_qwen3s(qwen_dir):
    spec = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] == {"type": "NFC"}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"] == {"Regex": PUBLISHED_PATTERN}
    assert (split["behavior"], split["invert"]) == ("Isolated", False)
    assert byte_level["type"] == "ByteLevel"
    assert (byte_level["add_prefix_space"], byte_level["use_regex"]) == (False, False)
    assert spec["decoder"]["type"] == "ByteLevel"
    model = spec["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is False and model["ignore_merges"] is False
    assert len(model["vocab"]) == 151643
    assert len(model["merges"]) == 151387  # one merge per multi-byte token, as in Qwen's merges.txt
    first = [" ".join(m) if isinstance(m, list) else m for m in model["merges"][:len(PUBLISHED_FIRST_MERGES)]]
    assert first == PUBLISHED_FIRST_MERGES


def test_known_encodings(qwen, ranks):
    # ids are tiktoken ranks: 'user' is rank 872, '\n' (byte 10) is rank 198, ' ' 220, '你好' one token 108386
    assert (ranks[b"user"], ranks[b"\n"], ranks[b" "], ranks["你好".encode()]) == (872, 198, 220, 108386)
    assert ids(qwen, "<|im_start|>user\n") == [151644, 872, 198]
    assert ids(qwen, "<|im_start|>assistant\n") == [151644, 77091, 198]
    assert ids(qwen, "<|im_start|>system\n") == [151644, 8948, 198]
    assert ids(qwen, "你好") == [108386]
    assert ids(qwen, "Hello, world!") == [9707, 11, 1879, 0]
    assert ids(qwen, "2024") == [17, 15, 17, 19]  # Qwen splits every digit
    assert ids(qwen, "<|im_end|>\n") == [151645, 198]
    assert ids(qwen, "<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]


def test_encodes_exactly_like_tiktoken_on_the_same_ranks(qwen, ranks):
    """The derived merges must reproduce tiktoken's BPE on Qwen's ranks and split pattern."""
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(name="qwen", pat_str=PUBLISHED_PATTERN, mergeable_ranks=ranks, special_tokens={})
    by_rank = {rank: token for token, rank in ranks.items()}
    rng = random.Random(0)
    texts = list(ROUND_TRIP)
    for _ in range(300):  # random text glued from random vocabulary entries (Chinese, code, spaces, bytes ...)
        raw = b"".join(by_rank[rng.randrange(len(by_rank))] for _ in range(rng.randint(1, 12)))
        texts.append(raw.decode("utf-8", errors="ignore"))
    for text in texts:
        text = unicodedata.normalize("NFC", text)  # the HF pipeline normalises to NFC first; tiktoken does not
        assert ids(qwen, text) == enc.encode_ordinary(text), text


def test_image_block(qwen):
    assert ids(qwen, "<|image_pad|>" * 197) == [151655] * 197
    block = "<|vision_start|>" + "<|image_pad|>" * 197 + "<|vision_end|>"
    assert ids(qwen, block) == [151652] + [151655] * 197 + [151653]
    mixed = ids(qwen, "看图：" + block + "\n描述")
    start = mixed.index(151652)
    assert mixed[start:start + 199] == [151652] + [151655] * 197 + [151653]
    assert mixed.count(151655) == 197


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(qwen, text):
    assert qwen.decode(ids(qwen, text)) == text


def test_round_trip_with_special_tokens_and_skip(qwen):
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>图里有什么？<|im_end|>\n<think>\n嗯</think>"
    assert qwen.decode(ids(qwen, text)) == text
    # special=True tokens are dropped, Qwen3's special=False ones (<think>) are kept, as with the real tokenizer
    assert qwen.decode(ids(qwen, text), skip_special_tokens=True) == "user\n图里有什么？\n<think>\n嗯</think>"


def test_nfc_normalisation(qwen):
    assert ids(qwen, "cafe\u0301") == ids(qwen, "café")


# -------------------------------------------------------------------------------------------- Qwen: chat template
def chat(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


ONE_TURN = [{"role": "user", "content": "你好"}]
TWO_TURNS = [
    {"role": "user", "content": "图里有什么？"},
    {"role": "assistant", "content": "一个红色的圆形。"},
    {"role": "user", "content": "它在哪里？"},
]


def test_chat_one_turn_generation_prompt(qwen):
    base = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert chat(qwen, ONE_TURN, add_generation_prompt=True) == base
    assert chat(qwen, ONE_TURN, add_generation_prompt=True, enable_thinking=True) == base
    assert chat(qwen, ONE_TURN, add_generation_prompt=True, enable_thinking=False) == base + "<think>\n\n</think>\n\n"


def test_chat_two_turns_generation_prompt(qwen):
    base = ("<|im_start|>user\n图里有什么？<|im_end|>\n"
            "<|im_start|>assistant\n一个红色的圆形。<|im_end|>\n"   # before the last query: no think block
            "<|im_start|>user\n它在哪里？<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert chat(qwen, TWO_TURNS, add_generation_prompt=True, enable_thinking=True) == base
    assert chat(qwen, TWO_TURNS, add_generation_prompt=True, enable_thinking=False) == base + "<think>\n\n</think>\n\n"


def test_chat_training_form_puts_think_block_on_answers_after_last_query(qwen):
    one = ONE_TURN + [{"role": "assistant", "content": "你好！"}]
    want_one = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n你好！<|im_end|>\n"
    for thinking in (True, False):
        assert chat(qwen, one, enable_thinking=thinking) == want_one
    two = TWO_TURNS + [{"role": "assistant", "content": "在中间。"}]
    want_two = ("<|im_start|>user\n图里有什么？<|im_end|>\n"
                "<|im_start|>assistant\n一个红色的圆形。<|im_end|>\n"
                "<|im_start|>user\n它在哪里？<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n在中间。<|im_end|>\n")
    for thinking in (True, False):
        assert chat(qwen, two, enable_thinking=thinking) == want_two


def test_chat_reasoning_is_stripped_from_history_and_kept_on_the_last_answer(qwen):
    messages = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "1+1？"},
        {"role": "assistant", "content": "<think>\n算一下\n</think>\n\n2"},
        {"role": "user", "content": "再加1？"},
        {"role": "assistant", "content": "<think>\n2+1\n</think>\n\n3"},
    ]
    want = ("<|im_start|>system\n你是助手。<|im_end|>\n"
            "<|im_start|>user\n1+1？<|im_end|>\n"
            "<|im_start|>assistant\n2<|im_end|>\n"
            "<|im_start|>user\n再加1？<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n2+1\n</think>\n\n3<|im_end|>\n")
    assert chat(qwen, messages) == want


def test_chat_text_tokenizes_to_the_expected_ids(qwen):
    text = chat(qwen, ONE_TURN, add_generation_prompt=True, enable_thinking=False)
    assert ids(qwen, text) == [151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]


# ------------------------------------------------------------------------------------------------- Qwen: errors
def test_missing_dashscope_says_what_to_install(monkeypatch):
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install dashscope"):
        T.qwen_tiktoken_path()


def test_wrong_rank_file_is_refused(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nIg== 1\n", encoding="ascii")
    with pytest.raises(ValueError, match="151643"):
        T.load_qwen_bpe_ranks(bad)


# ---------------------------------------------------------------------------------------------------------- BERT
CAPTIONS = [
    "图中有两个物体：左上方是一个红色的圆形，中间是一个蓝色的正方形。",
    "图中有一个物体：下方是一个黄色的星形。",
    "图中有三个物体：左边是一个紫色的菱形，右边是一个黑色的三角形，右下方是一个绿色的圆形。",
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return T.build_bert_tokenizer(CAPTIONS, tmp_path_factory.mktemp("bert_tok"))


def test_bert_special_ids(bert):
    assert [bert.pad_token_id, bert.unk_token_id, bert.cls_token_id, bert.sep_token_id, bert.mask_token_id] == [
        0, 1, 2, 3, 4]
    assert bert.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_bert_is_char_level_and_round_trips(bert):
    caption = CAPTIONS[2]
    encoded = bert(caption)["input_ids"]
    assert encoded[0] == 2 and encoded[-1] == 3
    assert bert.convert_ids_to_tokens(encoded[1:-1]) == list(caption)
    assert bert.unk_token_id not in encoded
    assert bert.decode(encoded, skip_special_tokens=True).replace(" ", "") == caption


def test_bert_vocab_is_deterministic_and_complete(bert):
    chars = sorted(set("".join(CAPTIONS)))
    vocab = T.bert_vocab(list(reversed(CAPTIONS)))
    assert vocab == T.bert_vocab(CAPTIONS)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab[5:5 + len(chars)] == chars
    # Letters and digits may continue a word; Chinese characters and punctuation always stand alone.
    assert {"##a", "##1"} <= set(vocab) and not {"##红", "##，", "##!"} & set(vocab)
    assert len(bert) == len(vocab)


def test_bert_ascii_and_unknown(bert):
    assert bert.tokenize("Hello 224") == ["h", "##e", "##l", "##l", "##o", "2", "##2", "##4"]
    assert bert("鑫")["input_ids"] == [2, 1, 3]  # a character outside the vocabulary is [UNK]


def test_bert_reloads(bert):
    again = BertTokenizerFast.from_pretrained(bert.name_or_path, local_files_only=True)
    auto = AutoTokenizer.from_pretrained(bert.name_or_path, local_files_only=True)
    for tok in (again, auto):
        assert tok(CAPTIONS[0])["input_ids"] == bert(CAPTIONS[0])["input_ids"]
