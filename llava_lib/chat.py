"""Talking to the model: greedy or sampled decoding with a KV cache, streamed as text pieces.

``ChatSession`` keeps a multi-turn history; the image (if any) stays in the first user turn, once. The same
iterator of text pieces feeds a terminal (``print(piece, end="")``) and the notebook widgets.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from PIL import Image

from .process import IMAGE_MARKER, clip_transform, encode_conversation


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int | None = None


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None and i >= 0}


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """Next token from ``[vocab]`` logits: argmax, or temperature + top-k + top-p sampling."""
    if not cfg.do_sample:
        return int(torch.argmax(logits))
    logits = logits.float() / max(cfg.temperature, 1e-5)
    if cfg.top_k and cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < cfg.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _cache_kwarg(llm) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both generations of the API."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def generate_tokens(llm, inputs_embeds: torch.Tensor, stop_ids: set[int], cfg: GenerationConfig,
                    stop_event: threading.Event | None = None, *, fast: bool | None = None) -> Iterator[int]:
    """Yield new token ids one at a time. Prefill once from embeddings, then one token per step on the cache.

    Stops at a stop id (not yielded), after ``max_new_tokens``, or when ``stop_event`` is set. ``fast`` picks the
    decode steps: None = ``LLAVA_FAST_DECODE`` or, unset, CUDA graphs on a static cache when on a GPU
    (:class:`llava_lib.model.accel.FastDecoder`: the same function, bf16 rounding may differ), transformers' dynamic
    cache on a CPU.
    """
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    out = llm(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1)
    cache, cache_kw = _cache_of(out), _cache_kwarg(llm)
    logits = out.logits[0, -1]
    device = inputs_embeds.device
    decoder = None
    try:
        for i in range(cfg.max_new_tokens):
            if stop_event is not None and stop_event.is_set():
                return
            token = _pick(logits.cpu() if generator is not None else logits, cfg, generator)
            if token in stop_ids:
                return
            yield token
            if i == cfg.max_new_tokens - 1:
                return  # the next token's logits would never be used
            if i == 0 and inputs_embeds.shape[0] == 1:  # after the first token: time-to-first-token stays the same
                decoder = _fast_decoder(llm, cache, inputs_embeds.shape[1] + cfg.max_new_tokens, fast)
                if decoder is not None:
                    cache = None
            if decoder is not None:
                logits = decoder.step(token)
            else:
                out = llm(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache_kw: cache})
                cache = _cache_of(out)
                logits = out.logits[0, -1]
    finally:
        if decoder is not None:
            decoder.lock.release()


def _fast_decoder(llm, cache, needed_len: int, fast: bool | None):
    """A FastDecoder loaded with ``cache``, or None for the plain path (CPU default, unsupported model, busy)."""
    from .model.accel import acquire_decoder, fast_decode_wanted
    if not fast_decode_wanted(llm, fast):
        return None
    decoder = acquire_decoder(llm, needed_len, fast=True)
    if decoder is not None:
        try:
            decoder.load(cache)
        except Exception:
            decoder.lock.release()
            raise
    return decoder


def stream_text(tokenizer, token_iter: Iterator[int]) -> Iterator[str]:
    """Turn token ids into text pieces; holds back a piece while it ends inside a multi-byte character."""
    ids: list[int] = []
    emitted = ""
    for token in token_iter:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text


def load_image(source) -> Image.Image:
    """A PIL image from a PIL image, a path or a URL (through the data pipeline's guarded fetch)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    from .data import fetch_image  # same timeouts, size cap and decoding checks as the cache builder
    return fetch_image(str(source))


@dataclass
class ChatSession:
    """A conversation with a LLaVA model (or a text-only one: ``model.vision`` is None or no image given).

    ``model`` is a :class:`llava_lib.model.LlavaStage1`; ``image`` a PIL image, path or URL.
    """

    model: object
    tokenizer: object
    image: object = None
    system: str | None = None
    enable_thinking: bool = False
    history: list[dict] = field(default_factory=list)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        self._pixels = None
        if self.image is not None:
            self.set_image(self.image)

    def set_image(self, image) -> None:
        """A new image starts a new conversation (its features belong to the first turn)."""
        self.image = load_image(image) if image is not None else None
        self._pixels = clip_transform(self.image).unsqueeze(0) if self.image is not None else None
        self.history = []

    def clear(self) -> None:
        """Forget the turns, keep the image."""
        self.history = []

    def messages(self, question: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        turns = self.history + [{"role": "user", "content": question}]
        if self._pixels is not None:
            first = turns[0]
            turns[0] = {"role": "user", "content": f"{IMAGE_MARKER}\n{first['content']}"}
        return msgs + turns

    def prompt_ids(self, question: str) -> list[int]:
        ids, _ = encode_conversation(self.tokenizer, self.messages(question), self.model.num_image_tokens,
                                     add_generation_prompt=True, enable_thinking=self.enable_thinking)
        return ids

    def stream(self, question: str, stop_event: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply piece by piece; when done (or stopped) the turn is added to the history."""
        ids = torch.tensor([self.prompt_ids(question)], device=self.model.device)
        pixels = self._pixels if self.model.vision is not None else None
        with torch.no_grad():
            embeds = self.model.embed(ids, pixels)
        pieces = []
        try:
            for piece in stream_text(self.tokenizer, generate_tokens(
                    self.model.llm, embeds, _stop_ids(self.tokenizer), self.generation, stop_event)):
                pieces.append(piece)
                yield piece
        finally:
            self.history += [{"role": "user", "content": question},
                             {"role": "assistant", "content": "".join(pieces)}]

    def ask(self, question: str) -> str:
        return "".join(self.stream(question))


def caption(model, tokenizer, image, prompt: str | None = None, max_new_tokens: int = 64) -> str:
    """Greedy caption of one image (the eval of Stage 1)."""
    session = ChatSession(model, tokenizer, image=image, generation=GenerationConfig(max_new_tokens=max_new_tokens))
    from .process import DEFAULT_PROMPT
    return session.ask(prompt or DEFAULT_PROMPT)


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a reply that may start with ``<think>...</think>``."""
    if "<think>" in text:
        head, _, rest = text.partition("<think>")
        thinking, closed, answer = rest.partition("</think>")
        if not closed:
            return thinking.strip("\n"), ""
        return thinking.strip("\n"), (head + answer).lstrip("\n")
    return "", text
