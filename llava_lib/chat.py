"""Talking to the model: transformers' ``generate`` with the model's own chat settings, streamed as text pieces.

``ChatSession`` keeps a multi-turn history; the image (if any) stays in the first user turn, once. ``stream`` runs
``generate`` in a background thread and yields the text pieces of a ``TextIteratorStreamer`` as they come: the same
iterator feeds a terminal (``print(piece, end="")``) and the notebook widgets."""
from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import torch
from PIL import Image
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .process import DEFAULT_PROMPT, IMAGE_MARKER, clip_transform, encode_conversation

# Qwen3's model card: sample in both modes (greedy decoding makes Qwen3 repeat itself endlessly). The thinking
# values are also those of Qwen3's generation_config.json; the card adds the non-thinking ones.
THINKING_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
NON_THINKING_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
# Qwen/Qwen3-0.6B's generation_config.json, for a model directory that has none.
QWEN3_GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                    **THINKING_SAMPLING}
# A thinking reply needs room for its think block before the answer.
MAX_NEW_TOKENS = {True: 1024, False: 512}
# transformers' values for "unset": greedy decoding with these draws no warning about sampling-only settings.
_GREEDY = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
# ``generate`` runs in threads kept between replies: its first call in a fresh thread took 15-30 ms longer
# (measured on the mini model on a CPU), as long as a whole mini prefill. Up to 4 replies generate at once.
_GENERATE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="llava-generate")


def chat_generation_config(llm, enable_thinking: bool = False, **overrides) -> GenerationConfig:
    """The settings of one reply, built from the LLM's own ``generation_config`` (token ids; in thinking mode also
    its sampling, when it samples), Qwen3's non-thinking sampling otherwise, room for thinking; ``overrides`` (any
    ``GenerationConfig`` field, e.g. ``max_new_tokens=200`` or ``do_sample=False``) last."""
    config = copy.deepcopy(llm.generation_config)
    if enable_thinking and config.do_sample:
        mode = {k: getattr(config, k) for k in THINKING_SAMPLING}
    else:
        mode = dict(THINKING_SAMPLING if enable_thinking else NON_THINKING_SAMPLING)
    mode["max_new_tokens"] = MAX_NEW_TOKENS[bool(enable_thinking)]
    if overrides.get("do_sample") is False:
        mode.update(_GREEDY)
    unknown = config.update(**{**mode, **overrides})
    if unknown:
        raise TypeError(f"未知的生成参数：{', '.join(unknown)}（可用的参数见 transformers.GenerationConfig）")
    return config


class _EventStop(StoppingCriteria):
    """Stops ``generate`` after the current token once any of the events is set (停止, or the reader went away)."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def load_image(source) -> Image.Image:
    """A PIL image from a PIL image, a path or a URL (through the data pipeline's guarded fetch)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    from .data import fetch_image  # same timeouts, size cap and decoding checks as the cache builder
    return fetch_image(str(source))


@dataclass
class ChatSession:
    """A conversation with a :class:`llava_lib.model.LlavaStage1` (text-only when ``model.vision`` is None or no
    image is given). ``generation`` overrides the model's chat settings; ``seed`` makes sampling repeatable. After a
    reply, ``finish_reason`` is ``"eos"``, ``"length"`` (cut off at ``max_new_tokens``) or ``"stopped"``."""

    model: object
    tokenizer: object
    image: object = None
    system: str | None = None
    enable_thinking: bool = False
    history: list[dict] = field(default_factory=list)
    generation: dict = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self):
        self._pixels = None
        self.finish_reason: str | None = None
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
            turns[0] = {"role": "user", "content": f"{IMAGE_MARKER}\n{turns[0]['content']}"}
        return msgs + turns

    def prompt_ids(self, question: str) -> list[int]:
        return encode_conversation(self.tokenizer, self.messages(question), self.model.num_image_tokens,
                                   add_generation_prompt=True, enable_thinking=self.enable_thinking)[0]

    def generation_config(self) -> GenerationConfig:
        """What the next reply uses: the model's settings for the current mode, then ``generation``."""
        return chat_generation_config(self.model.llm, self.enable_thinking, **self.generation)

    def stream(self, question: str, stop_event: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply piece by piece; when done (or stopped) the turn is added to the history. ``generate``
        runs in a thread; setting ``stop_event`` ends it after the current token; an error there is raised here."""
        ids = torch.tensor([self.prompt_ids(question)], device=self.model.device)
        pixels = self._pixels if self.model.vision is not None else None
        with torch.no_grad():
            embeds = self.model.embed(ids, pixels)
        config = self.generation_config()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        gone = threading.Event()  # set when the reader leaves early, so that generate stops too

        def run():
            try:
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                return self.model.llm.generate(
                    inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                    device=embeds.device),
                    generation_config=config, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_EventStop(stop_event, gone)]))[0].tolist()
            except Exception:
                streamer.end()  # the reader is waiting on the streamer's queue; the error is raised there below
                raise

        self.finish_reason = None
        pieces = []
        worker = _GENERATE.submit(run)
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
        finally:
            gone.set()
            if worker.exception() is None:  # waits for generate to end
                out, eos = worker.result(), config.eos_token_id
                eos = eos if isinstance(eos, list) else [eos]
                self.finish_reason = ("eos" if out and out[-1] in eos else
                                      "length" if len(out) >= config.max_new_tokens else "stopped")
            reply = "".join(pieces)
            # Qwen3's template drops past reasoning only up to </think>: a reply cut off while thinking would be
            # replayed into every later prompt, so the history keeps what came before its <think>.
            if "<think>" in reply and "</think>" not in reply:
                reply = reply.partition("<think>")[0]
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        worker.result()  # generate's error, if any, once the turn is recorded

    def ask(self, question: str) -> str:
        return "".join(self.stream(question))


def caption(model, tokenizer, image, max_new_tokens: int = 64) -> str:
    """Greedy caption of one image (the eval of Stage 1)."""
    greedy = {"do_sample": False, "max_new_tokens": max_new_tokens}
    return ChatSession(model, tokenizer, image=image, generation=greedy).ask(DEFAULT_PROMPT)


def qa_turns(messages: list[dict]) -> list[tuple[list[dict], str, str]]:
    """``(history, question, reference)`` for each assistant turn of a conversation: the reference turns before it
    are its history. The image marker is dropped (a session puts the image back into the first turn itself)."""
    turns = [{**m, "content": m["content"].replace(f"{IMAGE_MARKER}\n", "").replace(IMAGE_MARKER, "")}
             for m in messages if m["role"] != "system"]
    return [(turns[:k - 1], turns[k - 1]["content"], m["content"]) for k, m in enumerate(turns)
            if m["role"] == "assistant" and k > 0 and turns[k - 1]["role"] == "user"]


def answer_turns(model, tokenizer, image, messages: list[dict], max_new_tokens: int = 32) -> list[tuple[str, str]]:
    """``(generated, reference)`` for each assistant turn of a conversation (the eval of Stage 2), greedy."""
    session = ChatSession(model, tokenizer, image=image,
                          generation={"do_sample": False, "max_new_tokens": max_new_tokens})
    out = []
    for history, question, reference in qa_turns(messages):
        session.history = history
        out.append((session.ask(question), reference))
    return out


def answer_prompts(conversation: list[dict]) -> list[tuple[list[dict], str]]:
    """``(messages, reference)`` per assistant turn, as ``chat.answer_turns`` asks them (the image in turn one)."""
    out = []
    for history, question, reference in qa_turns(conversation):
        msgs = history + [{"role": "user", "content": question}]
        msgs[0] = {**msgs[0], "content": f"{IMAGE_MARKER}\n{msgs[0]['content']}"}
        out.append((msgs, reference))
    return out


@torch.no_grad()
def generate_batch(model, tokenizer, images, conversations, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy replies to ``conversations`` (each ending with a user turn, its image in ``images``), in batches.
    Rows are left-padded; ``generate`` derives the position ids from the mask, so a row decodes as it would alone."""
    config = chat_generation_config(model.llm, False, do_sample=False, max_new_tokens=max_new_tokens)
    was_training, out = model.training, []
    model.eval()
    for s in range(0, len(images), batch_size):
        rows = [encode_conversation(tokenizer, c, model.num_image_tokens, add_generation_prompt=True)[0]
                for c in conversations[s:s + batch_size]]
        batch = tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt").to(model.device)
        pixels = torch.stack([clip_transform(im) for im in images[s:s + batch_size]])
        embeds = model.embed(batch["input_ids"], pixels)
        new = model.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], generation_config=config)
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return out
