"""Tokenizers of the mini world, built offline: the *real* Qwen3 tokenizer from the BPE ranks that ship in the PyPI
package ``dashscope`` (so the mini LLM and Qwen3-0.6B read the same ids, and the image block needs no new embeddings),
and a character-level WordPiece vocabulary for the mini Chinese-CLIP (whose real vocab also splits Chinese so)."""
import base64
import importlib.util
import string
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

QWEN_BPE_SIZE = 151_643  # ranks 0..151642 in qwen.tiktoken; the added tokens follow directly
# Qwen3's added tokens in id order (151643..151668). The first 14 are special; the others (<tool_call>, <think>,
# ...) survive ``decode(..., skip_special_tokens=True)``, as with the real model.
_SPECIAL = ("<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
            "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|>")
_PLAIN = ("<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> "
          "<|file_sep|> <tool_response> </tool_response> <think> </think>")
QWEN3_ADDED_TOKENS = tuple((t, True) for t in _SPECIAL.split()) + tuple((t, False) for t in _PLAIN.split())
QWEN3_ADDED_TOKEN_IDS = {tok: QWEN_BPE_SIZE + i for i, (tok, _) in enumerate(QWEN3_ADDED_TOKENS)}
# Qwen2/Qwen3's pre-tokenizer regex; unlike GPT-4's it splits every digit on its own.
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Verbatim from Qwen/Qwen3-0.6B's tokenizer_config.json (the revision that reads `content` only when a string).
QWEN3_CHAT_TEMPLATE = Path(__file__).with_name("qwen3_chat_template.jinja").read_text(encoding="utf-8")
_DASHSCOPE_HINT = "Qwen 的 BPE 词表 qwen.tiktoken 随 PyPI 包 dashscope 一起发布，请先安装：pip install dashscope"


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
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in path.read_bytes().splitlines()
                                                                if line.strip())}
    if len(ranks) != QWEN_BPE_SIZE or sorted(ranks.values()) != list(range(QWEN_BPE_SIZE)):
        raise ValueError(f"{path} 不是 Qwen 的 BPE 词表：应有 {QWEN_BPE_SIZE} 个连续编号的 token，实际读到 {len(ranks)} 个。"
                         f"{_DASHSCOPE_HINT}")
    return ranks


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
    """Byte-level vocab and one merge per multi-byte token, in rank order: the last step of BPE on the token's bytes
    with every lower-ranked merge, which gives Qwen's published merges.txt (``TikTokenConverter`` emits every valid
    split instead: also correct, but twice as many merges and not Qwen's file)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_char = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe_parts(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"词表中的 token {token!r}（编号 {rank}）无法由更早的合并得到，这不是一个 BPE 词表。")
            merges.append((spell(parts[0]), spell(parts[1])))
    return {spell(token): rank for token, rank in ranks.items()}, merges


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
    tok.decoder = decoders.ByteLevel()
    for content, special in QWEN3_ADDED_TOKENS:  # in id order: each lands at its real id
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    return tok


def build_qwen_tokenizer(out_dir: str | Path):
    """Rebuild Qwen3's tokenizer offline into ``out_dir`` (Qwen/Qwen3-0.6B's settings: Qwen2Tokenizer, eos
    ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk) and return it as every later load gets it."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(
        tokenizer_object=qwen_backend_tokenizer(),
        added_tokens_decoder={QWEN3_ADDED_TOKEN_IDS[c]: AddedToken(c, normalized=False, special=s)
                              for c, s in QWEN3_ADDED_TOKENS},
        additional_special_tokens=[c for c, s in QWEN3_ADDED_TOKENS if s][1:],  # all but the pad token
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, add_prefix_space=False,
        errors="replace", split_special_tokens=False, clean_up_tokenization_spaces=False, model_max_length=131_072,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def _joins_a_word(ch: str) -> bool:
    """BERT's own pre-tokenization keeps ``ch`` inside a word (not CJK, not punctuation)."""
    norm = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    return len(pre_tokenizers.BertPreTokenizer().pre_tokenize_str(norm.normalize_str("a" + ch))) == 1


def bert_vocab(texts: list[str]) -> list[str]:
    """Specials, every distinct character of ``texts`` (sorted), ASCII digits/letters/punctuation, then ``##x``
    pieces for characters that can sit inside a word (so ``abc`` or ``224`` is spelt, not [UNK])."""
    chars = sorted({ch for text in texts for ch in text if not ch.isspace() and unicodedata.category(ch)[0] != "C"})
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars,
                                *string.digits, *string.ascii_lowercase, *string.punctuation]))
    return vocab + [f"##{ch}" for ch in vocab[5:] if _joins_a_word(ch)]


def build_bert_tokenizer(texts: list[str], out_dir: str | Path, model_max_length: int = 512):
    """Chinese-CLIP's tokenizer behaviour (lower-casing, one token per Chinese character, [CLS] ... [SEP]) over the
    characters of ``texts``, saved to ``out_dir`` and returned as loaded back from there."""
    from transformers import AutoTokenizer, BertTokenizerFast

    vocab = {tok: i for i, tok in enumerate(bert_vocab(texts))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None,
                                  model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
