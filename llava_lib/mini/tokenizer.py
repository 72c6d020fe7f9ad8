"""Tokenizers of the mini world, built offline.

* :func:`build_qwen_tokenizer` rebuilds the *real* Qwen3 tokenizer. Qwen's 151,643 byte-level BPE ranks ship in the
  PyPI package ``dashscope`` (``dashscope/resources/qwen.tiktoken``); we turn them into the vocab + merges of a
  ``tokenizers`` BPE model with the same pipeline as Qwen3-0.6B's published ``tokenizer.json`` (NFC, Qwen's split
  regex, byte-level, no prefix space), add Qwen3's 26 added tokens at their real ids (151643..151668) and Qwen3's
  chat template. Token ids are therefore the real ones: the mini LLM and Qwen3-0.6B read the same ids, and the
  image block ``<|vision_start|>`` + 197 x ``<|image_pad|>`` + ``<|vision_end|>`` needs no new embeddings.
* :func:`build_bert_tokenizer` builds a small character-level WordPiece vocabulary for the text side of the mini
  Chinese-CLIP (Chinese-CLIP's chinese-roberta vocab also splits Chinese into single characters).

Both save with ``save_pretrained`` so ``AutoTokenizer.from_pretrained(out_dir)`` loads them with no network.
"""
from __future__ import annotations

import base64
import importlib.util
import string
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

if TYPE_CHECKING:  # transformers is imported inside the builders, so importing the id constants stays cheap
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

# ---------------------------------------------------------------------------------------------------------------
# Qwen3 ids. Checked against Qwen3's published tokenizer_config.json / tokenizer.json (added_tokens_decoder).
# ---------------------------------------------------------------------------------------------------------------
QWEN_BPE_SIZE = 151_643  # ranks 0..151642 in qwen.tiktoken; added tokens follow directly

# (content, special) in id order, starting at QWEN_BPE_SIZE. "special" is Qwen3's flag: tokens with special=False
# (<tool_call>, <think>, ...) survive ``decode(..., skip_special_tokens=True)``, exactly as with the real model.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),         # 151643
    ("<|im_start|>", True),          # 151644
    ("<|im_end|>", True),            # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),    # 151647
    ("<|box_start|>", True),         # 151648
    ("<|box_end|>", True),           # 151649
    ("<|quad_start|>", True),        # 151650
    ("<|quad_end|>", True),          # 151651
    ("<|vision_start|>", True),      # 151652
    ("<|vision_end|>", True),        # 151653
    ("<|vision_pad|>", True),        # 151654
    ("<|image_pad|>", True),         # 151655
    ("<|video_pad|>", True),         # 151656
    ("<tool_call>", False),          # 151657
    ("</tool_call>", False),         # 151658
    ("<|fim_prefix|>", False),       # 151659
    ("<|fim_middle|>", False),       # 151660
    ("<|fim_suffix|>", False),       # 151661
    ("<|fim_pad|>", False),          # 151662
    ("<|repo_name|>", False),        # 151663
    ("<|file_sep|>", False),         # 151664
    ("<tool_response>", False),      # 151665
    ("</tool_response>", False),     # 151666
    ("<think>", False),              # 151667
    ("</think>", False),             # 151668
)
QWEN3_ADDED_TOKEN_IDS: dict[str, int] = {tok: QWEN_BPE_SIZE + i for i, (tok, _) in enumerate(QWEN3_ADDED_TOKENS)}
# tokenizer_config.json's "additional_special_tokens": the special ones except <|endoftext|> (the pad token).
QWEN3_ADDITIONAL_SPECIAL_TOKENS = tuple(tok for tok, special in QWEN3_ADDED_TOKENS if special)[1:]

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
THINK, END_THINK = "<think>", "</think>"

ENDOFTEXT_ID = QWEN3_ADDED_TOKEN_IDS[ENDOFTEXT]        # 151643, also the pad token
IM_START_ID = QWEN3_ADDED_TOKEN_IDS[IM_START]          # 151644
IM_END_ID = QWEN3_ADDED_TOKEN_IDS[IM_END]              # 151645, the eos token of the chat model
VISION_START_ID = QWEN3_ADDED_TOKEN_IDS[VISION_START]  # 151652
VISION_END_ID = QWEN3_ADDED_TOKEN_IDS[VISION_END]      # 151653
IMAGE_PAD_ID = QWEN3_ADDED_TOKEN_IDS[IMAGE_PAD]        # 151655
THINK_ID = QWEN3_ADDED_TOKEN_IDS[THINK]                # 151667
END_THINK_ID = QWEN3_ADDED_TOKEN_IDS[END_THINK]        # 151668

QWEN3_MODEL_MAX_LENGTH = 131_072  # tokenizer_config.json of Qwen3-0.6B

# The pre-tokenizer regex of Qwen2/Qwen3 (tokenizer.json, pre_tokenizer.Split). Unlike GPT-4's pattern it splits
# every digit on its own (\p{N}, not \p{N}{1,3}).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's chat template, copied verbatim (it is data the tokenizer needs) from the "chat_template" field of
# Qwen/Qwen3-0.6B's tokenizer_config.json (the revision that reads `content` only when it is a string).
# enable_thinking=False appends an empty think block to the generation prompt; assistant turns after the last user
# query carry a think block, earlier ones have their reasoning stripped.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

_DASHSCOPE_HINT = "Qwen 的 BPE 词表 qwen.tiktoken 随 PyPI 包 dashscope 一起发布，请先安装：pip install dashscope"


# ---------------------------------------------------------------------------------------------------------------
# Qwen: tiktoken ranks -> byte-level BPE
# ---------------------------------------------------------------------------------------------------------------
def qwen_tiktoken_path() -> Path:
    """Where the installed ``dashscope`` keeps ``qwen.tiktoken``; found without importing dashscope (it is slow)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"找不到 Python 包 dashscope。{_DASHSCOPE_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"dashscope 已安装，但缺少词表文件 {path}。请重新安装：pip install --force-reinstall dashscope")
    return path


def load_qwen_bpe_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """Read a tiktoken file (``base64(token) rank`` per line) into ``{token bytes: rank}``; checks it is Qwen's."""
    path = Path(path) if path is not None else qwen_tiktoken_path()
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != QWEN_BPE_SIZE or sorted(ranks.values()) != list(range(QWEN_BPE_SIZE)):
        raise ValueError(f"{path} 不是 Qwen 的 BPE 词表：应有 {QWEN_BPE_SIZE} 个连续编号的 token，实际读到 {len(ranks)} 个。"
                         f"{_DASHSCOPE_HINT}")
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (how byte-level BPE spells bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Run tiktoken's BPE on ``token`` using only merges ranked below ``max_rank`` (lowest rank first)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def qwen_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and the merge list, one merge per multi-byte token, in rank order.

    A BPE tokenizer merges the pair whose product ranks lowest; so the merge that makes token T is the last step of
    BPE on T's own bytes with every merge ranked below T. This gives 151,387 merges, like Qwen's published
    merges.txt (same count, same opening lines), and ``tokenizers``' BPE then reproduces tiktoken's encoding.
    (``transformers.convert_slow_tokenizer.TikTokenConverter`` instead emits every valid split of every token:
    also correct, but twice as many merges and not the file Qwen publishes.)
    """
    byte_char = _byte_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"词表中的 token {token!r}（编号 {rank}）无法由更早的合并得到，这不是一个 BPE 词表。")
        merges.append((spell(parts[0]), spell(parts[1])))
    return vocab, merges


def qwen_backend_tokenizer(ranks: dict[bytes, int] | None = None) -> Tokenizer:
    """The ``tokenizers`` pipeline of Qwen3-0.6B's tokenizer.json, with the 26 added tokens at their real ids."""
    vocab, merges = qwen_vocab_and_merges(ranks if ranks is not None else load_qwen_bpe_ranks())
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()  # bytes back to text; its options do not affect decoding
    # Added tokens get consecutive ids after the BPE vocab, so adding them in id order puts each at its real id.
    for content, special in QWEN3_ADDED_TOKENS:
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    for content, want in QWEN3_ADDED_TOKEN_IDS.items():
        if tok.token_to_id(content) != want:  # the BPE vocab must not already contain an added token
            raise RuntimeError(f"{content} 的编号是 {tok.token_to_id(content)}，应为 {want}。")
    return tok


def build_qwen_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Rebuild Qwen3's tokenizer offline, save it to ``out_dir`` and return it as loaded back from there.

    The saved folder mirrors Qwen/Qwen3-0.6B's: ``tokenizer_class`` Qwen2Tokenizer, eos ``<|im_end|>``, pad
    ``<|endoftext|>``, no bos/unk, Qwen3's chat template. We return ``AutoTokenizer.from_pretrained(out_dir)`` so the
    caller holds exactly what every later load (mini LLM folder, notebooks) gets. Takes a few seconds.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    out_dir = Path(out_dir)
    backend = qwen_backend_tokenizer()
    added_tokens_decoder = {
        QWEN3_ADDED_TOKEN_IDS[content]: AddedToken(content, normalized=False, special=special)
        for content, special in QWEN3_ADDED_TOKENS
    }
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,  # replaces the backend Qwen2Tokenizer would build: ours mirrors tokenizer.json
        added_tokens_decoder=added_tokens_decoder,
        additional_special_tokens=list(QWEN3_ADDITIONAL_SPECIAL_TOKENS),
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        add_prefix_space=False,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        model_max_length=QWEN3_MODEL_MAX_LENGTH,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------------------------
# BERT-style tokenizer for the mini Chinese-CLIP text tower
# ---------------------------------------------------------------------------------------------------------------
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
BERT_ASCII = string.digits + string.ascii_lowercase + string.punctuation  # input is lower-cased before lookup


def _is_cjk(ch: str) -> bool:
    """BERT's test for a CJK ideograph: such characters always become single-character words."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _is_punctuation(ch: str) -> bool:
    """BERT's test for punctuation: it is split off as a word of its own."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def bert_vocab(texts: list[str]) -> list[str]:
    """Specials, every distinct character of ``texts`` (sorted), ASCII digits/letters/punctuation, then ``##x``
    continuation pieces for characters that can sit inside a word (so ``abc`` or ``224`` is spelt, not [UNK])."""
    chars = sorted({ch for text in texts for ch in text if not ch.isspace() and unicodedata.category(ch)[0] != "C"})
    vocab = list(BERT_SPECIAL_TOKENS)
    seen = set(vocab)
    for ch in [*chars, *BERT_ASCII]:
        if ch not in seen:
            vocab.append(ch)
            seen.add(ch)
    inner = [tok for tok in vocab[len(BERT_SPECIAL_TOKENS):] if not _is_cjk(tok) and not _is_punctuation(tok)]
    vocab.extend(f"##{ch}" for ch in inner)
    return vocab


def build_bert_tokenizer(texts: list[str], out_dir: str | Path, model_max_length: int = 512) -> BertTokenizerFast:
    """A character-level BERT WordPiece tokenizer over the characters of ``texts``, saved to ``out_dir``.

    Same behaviour as Chinese-CLIP's tokenizer (lower-casing, each Chinese character its own token, [CLS] ... [SEP]),
    with a vocabulary sized to the mini world. Returns the tokenizer as loaded back from ``out_dir``.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    out_dir = Path(out_dir)
    vocab = {tok: i for i, tok in enumerate(bert_vocab(texts))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None,
                                  model_max_length=model_max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


__all__ = [
    "QWEN_BPE_SIZE", "QWEN3_ADDED_TOKENS", "QWEN3_ADDED_TOKEN_IDS", "QWEN3_ADDITIONAL_SPECIAL_TOKENS",
    "QWEN3_MODEL_MAX_LENGTH", "QWEN3_CHAT_TEMPLATE",
    "QWEN_PRETOKENIZE_PATTERN",
    "ENDOFTEXT", "IM_START", "IM_END", "VISION_START", "VISION_END", "IMAGE_PAD", "THINK", "END_THINK",
    "ENDOFTEXT_ID", "IM_START_ID", "IM_END_ID", "VISION_START_ID", "VISION_END_ID", "IMAGE_PAD_ID", "THINK_ID",
    "END_THINK_ID",
    "qwen_tiktoken_path", "load_qwen_bpe_ranks", "qwen_vocab_and_merges", "qwen_backend_tokenizer",
    "build_qwen_tokenizer", "bert_vocab", "build_bert_tokenizer", "BERT_SPECIAL_TOKENS",
]
