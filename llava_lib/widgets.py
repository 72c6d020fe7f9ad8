"""ipywidgets chat cells: ``TextChatWidget`` (01_qwen3_chat) and ``ImageChatWidget`` (05_llava_chat).

A notebook cell only does ``TextChatWidget(session).display()``. Generation (and image loading) runs in a worker
``threading.Thread`` so the kernel stays free and 停止 can set the ``threading.Event`` that ``ChatSession.stream``
checks. The worker only assigns widget traits (``HTML.value``, ``Box.children``), which JupyterLab renders from
any thread; nothing is printed to an ``Output`` widget. Every error ends up in the widget's error line.

Headless use (tests)::

    w = TextChatWidget(session)
    w.question.value = "你好"; w.send(); w.wait(10)
    w.history, w.history_html, w.error
"""
from __future__ import annotations

import html
import io
import threading
import time
from pathlib import Path

import ipywidgets as W
from PIL import Image

from .chat import ChatSession, load_image, split_thinking

try:  # the data pipeline's guarded decode and its error type
    from .data import FetchError, decode_image, reason_label
except Exception:  # pragma: no cover - data pipeline not importable: fall back to plain PIL
    FetchError, decode_image, reason_label = None, None, None

__all__ = ["TextChatWidget", "ImageChatWidget", "render_reply"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
THUMBNAIL_SIZE = 320

_GREY = "#6b7280"
_BUBBLE = ("border-radius:12px;padding:6px 10px;margin:2px 0;white-space:pre-wrap;word-break:break-word;"
           "line-height:1.5;")
_USER_STYLE = _BUBBLE + "background:#dbeafe;color:#111827;"
_BOT_STYLE = _BUBBLE + "background:#f3f4f6;color:#111827;"
_THOUGHT_STYLE = (f"color:{_GREY};font-size:0.9em;white-space:pre-wrap;word-break:break-word;"
                  "border-left:3px solid #d1d5db;padding:2px 8px;margin:2px 0;")

# FetchError.reason -> what the student can do about it
_FETCH_HINTS = {
    "not_found": "请检查路径是否正确，或改用示例图片 / 上传图片。",
    "read_error": "请检查文件权限，或改用示例图片 / 上传图片。",
    "bad_url": "请输入以 http:// 或 https:// 开头的图片网址，或本地图片路径。",
    "not_image": "这不是图片文件，请换一张 JPG 或 PNG 图片。",
    "decode_error": "图片文件已损坏，请换一张 JPG 或 PNG 图片。",
    "truncated": "图片文件不完整，请重新下载或换一张图片。",
    "too_large": "图片太大，请换一张较小的图片。",
    "decompression_bomb": "图片像素太多，请换一张较小的图片。",
    "timeout": "网络超时，请稍后重试或换一个网址。",
    "connection": "无法连接服务器，请检查网址和网络，或改用示例图片 / 上传图片。",
    "incomplete": "下载中断，请重试或换一个网址。",
}


# ----------------------------------------------------------------------------------------------- rendering
def _split(text: str) -> tuple[str, str, bool]:
    """(thinking, answer, still_thinking) of a (possibly partial) reply."""
    if "</think>" in text and "<think>" not in text:  # template opened the think block itself
        thinking, _, answer = text.partition("</think>")
        return thinking.strip("\n"), answer.lstrip("\n"), False
    thinking, answer = split_thinking(text)
    return thinking, answer, "<think>" in text and "</think>" not in text


def _end_note(session, text: str, stopped: bool) -> str:
    """The grey note under a finished reply: stopped by the student, or cut off at the length limit."""
    if stopped:
        return "已停止"
    if getattr(session, "finish_reason", None) == "length":
        if _split(text)[2]:
            return "思考被截断：达到最大生成长度，还没有回答"
        return "回答被截断：达到最大生成长度"
    return ""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def render_reply(text: str, *, streaming: bool = False, note: str = "") -> tuple[str, str]:
    """HTML of (thinking block, answer bubble) for one assistant reply; the thinking block is folded and grey.

    While the model is still thinking the block is open (so the student watches it grow); once the answer
    starts it folds. ``note`` (e.g. "已停止", or that the reply was cut off) is appended in grey.
    """
    thinking, answer, still_thinking = _split(text)
    thought_html = ""
    if thinking.strip() or (streaming and still_thinking):
        summary = "思考中…" if streaming and still_thinking else "思考过程（点击展开）"
        opened = " open" if streaming and still_thinking else ""
        thought_html = (f'<details class="llava-chat-thought"{opened} style="{_THOUGHT_STYLE}">'
                        f'<summary style="cursor:pointer;color:{_GREY};">{summary}</summary>'
                        f'<div style="color:{_GREY};">{_esc(thinking)}</div></details>')
    state = "llava-chat-streaming" if streaming else "llava-chat-done"
    body = _esc(answer)
    if streaming and not answer:
        body = f'<span style="color:{_GREY};">{"…" if not still_thinking else "（思考中）"}</span>'
    if note:
        body += f'<span style="color:{_GREY};font-size:0.85em;">{"" if not answer else " "}（{_esc(note)}）</span>'
    answer_html = f'<div class="llava-chat-bubble {state}" style="{_BOT_STYLE}">{body}</div>'
    return thought_html, answer_html


def _user_html(text: str) -> str:
    return f'<div class="llava-chat-bubble" style="{_USER_STYLE}">{_esc(text)}</div>'


class _Message:
    """One chat bubble row: user on the right, assistant (thinking block + answer) on the left."""

    def __init__(self, role: str, text: str = "", streaming: bool = False):
        self.role = role
        if role == "user":
            self.thought = None
            self.answer = W.HTML(_user_html(text), layout=W.Layout(max_width="80%"))
            inner = self.answer
        else:
            thought, answer = render_reply(text, streaming=streaming)
            self.thought = W.HTML(thought, layout=W.Layout(display="" if thought else "none"))
            self.thought.add_class("llava-chat-thought")
            self.answer = W.HTML(answer)
            inner = W.VBox([self.thought, self.answer], layout=W.Layout(max_width="80%"))
        self.answer.add_class("llava-chat-answer")
        self.row = W.HBox([inner], layout=W.Layout(
            justify_content="flex-end" if role == "user" else "flex-start", width="100%"))
        self.row.add_class("llava-chat-message")
        self.row.add_class(f"llava-chat-{role}")

    def update(self, text: str, streaming: bool = False, note: str = "") -> None:
        """Called from the worker thread: only assigns trait values (unchanged values send nothing)."""
        thought, answer = render_reply(text, streaming=streaming, note=note)
        self.thought.value = thought
        self.thought.layout.display = "" if thought else "none"
        self.answer.value = answer

    @property
    def html(self) -> str:
        return (self.thought.value if self.thought is not None else "") + self.answer.value

    def close(self) -> None:
        for w in (self.thought, self.answer, self.row):
            if w is not None:
                w.close()


def _button(description: str, css: str, style: str = "", tooltip: str = "", width: str = "auto") -> W.Button:
    b = W.Button(description=description, button_style=style, tooltip=tooltip or description,
                 layout=W.Layout(width=width))
    b.add_class(css)
    return b


# ----------------------------------------------------------------------------------------------- base
class _ChatWidgetBase:
    """History, question box, 发送/停止/清空, status and error lines, and the worker thread."""

    #: seconds between two streamed updates of the reply bubble (every piece still arrives)
    refresh_interval = 0.05
    #: how long 清空 / 换新图片 wait for a stopped worker
    halt_timeout = 10.0
    clear_label = "清空"

    def __init__(self, session: ChatSession):
        self.session = session
        self.last_pieces: list[str] = []  # the pieces of the last reply, as streamed
        self._worker: threading.Thread | None = None
        self._task = ""
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._error = ""
        self._messages: list[_Message] = []

        self.history_box = W.VBox([], layout=W.Layout(width="100%"))
        self.history_box.add_class("llava-chat-history")
        # column-reverse around one child keeps the scroll position at the newest message
        self.history_scroll = W.Box([self.history_box], layout=W.Layout(
            flex_flow="column-reverse", overflow="auto", max_height="460px", min_height="120px",
            border="1px solid #e5e7eb", padding="6px", width="100%"))
        self.question = W.Textarea(placeholder="输入问题，然后点「发送」", rows=2,
                                   layout=W.Layout(width="100%"))
        self.question.add_class("llava-chat-input")
        self.send_button = _button("发送", "llava-chat-send", "primary", "把问题发给模型")
        self.stop_button = _button("停止", "llava-chat-stop", "warning", "停止正在生成的回答")
        self.stop_button.disabled = True
        self.clear_button = _button(self.clear_label, "llava-chat-clear", "", "清空对话记录", width="auto")
        self.status_line = W.HTML("")
        self.status_line.add_class("llava-chat-status")
        self.error_line = W.HTML("")
        self.error_line.add_class("llava-chat-error")

        self.send_button.on_click(self._guard(lambda _: self.send()))
        self.stop_button.on_click(self._guard(lambda _: self.stop()))
        self.clear_button.on_click(self._guard(lambda _: self.clear()))

    # ---- public API
    @property
    def busy(self) -> bool:
        """True while a reply is generated (or an image loaded) in the worker thread."""
        worker = self._worker
        return worker is not None and worker.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Join the worker; True when it has finished (False: still running after ``timeout`` seconds)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return not self.busy

    @property
    def error(self) -> str:
        """The text of the error line ("" when there is none)."""
        return self._error

    @property
    def status(self) -> str:
        return self._status

    @property
    def history(self) -> list[dict]:
        """The session's turns (what the model will see next time)."""
        return list(self.session.history)

    @property
    def history_html(self) -> str:
        """The HTML of the chat bubbles, as the browser shows them (includes the reply being streamed)."""
        return "".join(m.html for m in self._messages)

    @property
    def last_reply(self) -> str:
        return "".join(self.last_pieces)

    def send(self, question: str | None = None) -> bool:
        """Ask ``question`` (default: the text box) in the worker thread; False if refused (busy or empty)."""
        from_box = question is None
        text = (self.question.value if from_box else question).strip()
        with self._lock:
            if self.busy:
                self._show_error(self._busy_message())
                return False
            if not text:
                self._show_error("请先在输入框里写一个问题，再点「发送」。")
                return False
            self._clear_error()
            if from_box:
                self.question.value = ""
            user, bot = _Message("user", text), _Message("assistant", "", streaming=True)
            self._append(user, bot)
            self._start("generate", self._generate, text, user, bot)
        self._set_status("正在生成回答…（可以点「停止」）")
        return True

    def stop(self) -> bool:
        """Ask the worker to stop after the current token; False when nothing is running."""
        if not self.busy:
            self._set_status("现在没有正在生成的回答。")
            return False
        self._stop_event.set()
        self._set_status("正在停止…")
        return True

    def clear(self) -> bool:
        """Forget the conversation (a running reply is stopped first)."""
        if not self._halt():
            return False
        self.session.clear()
        self._render_history()
        self._clear_error()
        self._set_status(self._cleared_message())
        return True

    def display(self) -> None:
        from IPython.display import display
        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ---- worker
    def _start(self, task: str, target, *args) -> None:
        self._stop_event = threading.Event()
        self._task = task
        worker = threading.Thread(target=self._run, args=(target, args), name=f"llava-chat-{task}", daemon=True)
        self._worker = worker
        self.stop_button.disabled = False
        worker.start()

    def _run(self, target, args) -> None:
        try:
            target(*args)
        except Exception as e:  # last resort: the targets report their own errors
            self._show_error(f"出错了：{type(e).__name__}: {e}。请重试；如果一直出错，请重新运行这个单元格。")
        finally:
            self.stop_button.disabled = True

    def _halt(self) -> bool:
        """Stop a running worker and wait for it (bounded); False (and a message) if it does not finish."""
        if self.busy:
            self._stop_event.set()
            if not self.wait(self.halt_timeout):
                self._show_error("上一步操作还没有结束，请稍等几秒再试。")
                return False
        return True

    def _generate(self, question: str, user: _Message, bot: _Message) -> None:
        before = len(self.session.history)
        pieces: list[str] = []
        self.last_pieces = pieces
        text, last_update, failed = "", 0.0, None
        try:
            for piece in self.session.stream(question, stop_event=self._stop_event):
                pieces.append(piece)
                text += piece
                now = time.monotonic()
                if now - last_update >= self.refresh_interval:
                    bot.update(text, streaming=True)
                    last_update = now
        except Exception as e:
            failed = e
        stopped = self._stop_event.is_set()
        if failed is not None:
            bot.update(text, note="生成出错")
            self._show_error(f"生成失败：{type(failed).__name__}: {failed}。请检查模型是否已正确加载（或显存是否"
                             f"不足），然后重新发送；也可以先点「{self.clear_label}」。")
            self._set_status("")
        else:
            note = _end_note(self.session, text, stopped)
            bot.update(text, note=note)
            self._set_status(f"{note}。" if note else "回答完成。")
        after = len(self.session.history)
        if after == before and failed is not None:  # failed before the turn was recorded: take the bubbles out
            self._remove(user, bot)
            if not self.question.value:
                self.question.value = question
        elif after != before + 2:
            self._render_history()

    # ---- history view
    def _append(self, *messages: _Message) -> None:
        self._messages.extend(messages)
        self.history_box.children = tuple(m.row for m in self._messages)

    def _remove(self, *messages: _Message) -> None:
        self._messages = [m for m in self._messages if m not in messages]
        self.history_box.children = tuple(m.row for m in self._messages)
        for m in messages:
            m.close()

    def _render_history(self) -> None:
        old = self._messages
        self._messages = [_Message(t["role"], t.get("content") or "") for t in self.session.history
                          if t.get("role") in ("user", "assistant")]
        self.history_box.children = tuple(m.row for m in self._messages)
        for m in old:
            m.close()

    # ---- status and errors
    _status = ""

    def _set_status(self, text: str) -> None:
        self._status = text
        self.status_line.value = f'<span style="color:{_GREY};">{_esc(text)}</span>' if text else ""

    def _show_error(self, text: str) -> None:
        self._error = text
        self.error_line.value = f'<span style="color:#b91c1c;font-weight:600;">⚠ {_esc(text)}</span>'

    def _clear_error(self) -> None:
        self._error = ""
        self.error_line.value = ""

    def _busy_message(self) -> str:
        if self._task == "image":
            return "正在加载图片，请等它完成（或点「停止」取消）后再发送。"
        return "上一条回答还在生成中：请等它完成，或先点「停止」，再发送新问题。"

    def _cleared_message(self) -> str:
        return "对话已清空。"

    def _guard(self, handler):
        """Wrap a widget callback so that any exception is shown in the error line instead of a log."""
        def wrapped(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as e:
                self._show_error(f"操作失败：{type(e).__name__}: {e}。请重试；如果一直出错，请重新运行这个单元格。")
        return wrapped

    def _buttons(self) -> W.HBox:
        return W.HBox([self.send_button, self.stop_button, self.clear_button])


# ----------------------------------------------------------------------------------------------- text chat
class TextChatWidget(_ChatWidgetBase):
    """Chat with the text-only Qwen3 (01_qwen3_chat): system prompt, thinking switch, streamed bubbles.

    ``TextChatWidget(session).display()``; ``session`` is a :class:`llava_lib.chat.ChatSession`.
    """

    def __init__(self, session: ChatSession):
        super().__init__(session)
        self.system_box = W.Textarea(value=session.system or "", rows=2, layout=W.Layout(width="100%"),
                                     placeholder="系统提示词（可选），例如：你是一位耐心的中文助教，回答简洁。")
        self.system_box.add_class("llava-chat-system")
        self.thinking = W.ToggleButton(value=bool(session.enable_thinking), description="思考模式",
                                       button_style="success" if session.enable_thinking else "", tooltip="打开后模型先思考再回答；思考内容折叠显示为灰色")
        self.thinking.add_class("llava-chat-thinking")
        self.system_box.observe(self._guard(self._on_system), "value")
        self.thinking.observe(self._guard(self._on_thinking), "value")
        self._render_history()
        self.widget = W.VBox([
            W.HTML("<b>系统提示词</b>"), self.system_box, self.thinking,
            self.history_scroll, self.question, self._buttons(), self.status_line, self.error_line,
        ], layout=W.Layout(width="100%", max_width="900px"))
        self.widget.add_class("llava-chat")
        self.widget.add_class("llava-text-chat")

    def _on_system(self, change) -> None:
        self.session.system = change["new"].strip() or None

    def _on_thinking(self, change) -> None:
        self.session.enable_thinking = bool(change["new"])
        self.thinking.button_style = "success" if change["new"] else ""
        self._set_status("思考模式已打开：模型会先思考（灰色折叠部分）再回答。" if change["new"]
                         else "思考模式已关闭。")


# ----------------------------------------------------------------------------------------------- image chat
def _thumbnail_bytes(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decode_upload(data: bytes, name: str) -> Image.Image:
    """Decode uploaded bytes fully (so a broken or non-image file fails here, with a reason)."""
    if decode_image is not None:
        return decode_image(data, name)
    with Image.open(io.BytesIO(data)) as probe:  # pragma: no cover - fallback without the data pipeline
        probe.verify()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _image_error(e: Exception, what: str) -> str:
    if FetchError is not None and isinstance(e, FetchError):
        hint = _FETCH_HINTS.get(e.reason)
        if hint is None:
            hint = ("网址可能已失效，请换一个图片网址。" if e.reason.startswith("http_4")
                    else "服务器暂时出错，请稍后重试或换一个网址。" if e.reason.startswith("http_5")
                    else "请换一张图片再试。")
        return f"无法加载{what}：{e.message}（{reason_label(e.reason)}）。{hint}当前的图片和对话保持不变。"
    return (f"无法加载{what}：{type(e).__name__}: {e}。请换一张 JPG/PNG 图片，或检查网址/路径后重试。"
            "当前的图片和对话保持不变。")


def _example_caption(path: Path) -> str:
    txt = path.with_suffix(".txt")
    try:
        return txt.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


class ImageChatWidget(_ChatWidgetBase):
    """Chat about an image (05_llava_chat): pick an example, upload or give a URL; multi-turn, streamed.

    ``ImageChatWidget(session, example_dir="data_example").display()``. Loading an image runs in the worker
    thread too (a URL can be slow); call :meth:`wait` before reading the result headlessly.
    """

    clear_label = "清空（保留图片）"

    def __init__(self, session: ChatSession, example_dir=None):
        super().__init__(session)
        self.clear_button.tooltip = "清空对话记录，图片保留"
        self.example_dir = Path(example_dir).expanduser() if example_dir is not None else None
        self.examples: list[Path] = []
        if self.example_dir is not None and self.example_dir.is_dir():
            self.examples = sorted(p for p in self.example_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.image_name = ""

        self.image = W.Image(format="jpeg", layout=W.Layout(max_width=f"{THUMBNAIL_SIZE}px", display="none"))
        self.image.add_class("llava-chat-image")
        self.image_caption = W.HTML("")
        self.image_caption.add_class("llava-chat-image-caption")
        options = [("（选择示例图片）", "")] + [(self._example_label(p), str(p)) for p in self.examples]
        first = str(self.examples[0]) if self.examples and session.image is None else ""
        self.examples_dropdown = W.Dropdown(options=options, value=first, description="示例图片",
                                            disabled=not self.examples, layout=W.Layout(width="100%"))
        self.examples_dropdown.add_class("llava-chat-examples")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="上传图片")
        self.upload.add_class("llava-chat-upload")
        self.url = W.Text(placeholder="图片网址（http/https）或本地路径", layout=W.Layout(width="100%"))
        self.url.add_class("llava-chat-url")
        self.url_button = _button("打开网址", "llava-chat-url-load", "", "加载上面网址或路径的图片（会重置对话）")
        self.new_image_button = _button("换新图片（重置对话）", "llava-chat-new-image", "info",
                                        "换到下一张示例图片，并清空对话")

        self.examples_dropdown.observe(self._guard(self._on_example), "value")
        self.upload.observe(self._guard(self._on_upload), "value")
        self.url_button.on_click(self._guard(lambda _: self._on_url()))
        self.new_image_button.on_click(self._guard(lambda _: self.next_example()))

        if example_dir is not None and not self.examples:
            self._show_error(f"在 {self.example_dir} 里没有找到示例图片（*.jpg）。迷你世界可以运行 "
                             "python -m llava_lib.mini examples 生成；也可以直接上传图片或输入网址。")
        if session.image is not None:
            self._show_image(session.image, "当前图片")
        elif first:  # start with the first example, loaded here (a local file: fast)
            self._load_and_apply(first, self.examples[0].name)
        else:
            self.image_caption.value = f'<span style="color:{_GREY};">还没有图片：请选择示例图片、上传图片或输入网址。</span>'
        self._render_history()

        sources = W.VBox([self.image, self.image_caption, self.examples_dropdown, self.upload,
                          W.HBox([self.url, self.url_button]), self.new_image_button],
                         layout=W.Layout(width=f"{THUMBNAIL_SIZE + 20}px", min_width="240px"))
        chat = W.VBox([self.history_scroll, self.question, self._buttons(), self.status_line, self.error_line],
                      layout=W.Layout(flex="1 1 auto", min_width="300px"))
        self.widget = W.HBox([sources, chat], layout=W.Layout(width="100%", flex_flow="row wrap"))
        self.widget.add_class("llava-chat")
        self.widget.add_class("llava-image-chat")

    # ---- public API
    def new_image(self, source, name: str | None = None) -> bool:
        """Load ``source`` (path, URL, bytes of an uploaded file, PIL image) in the worker and start a new
        conversation with it. False if it could not start. On failure the old image and history stay."""
        if source is None or (isinstance(source, str) and not source.strip()):
            self._show_error("请先选择示例图片、上传图片，或输入图片网址。")
            return False
        if isinstance(source, str):
            source = source.strip()
        if not self._halt():
            return False
        label = name or (Path(source).name if isinstance(source, (str, Path)) else "图片")
        with self._lock:
            if self.busy:
                self._show_error(self._busy_message())
                return False
            self._clear_error()
            self._start("image", self._load_and_apply, source, label)
        self._set_status(f"正在加载图片 {label} …")
        return True

    def next_example(self) -> bool:
        """Switch to the next example image (wraps around); resets the conversation."""
        if not self.examples:
            self._show_error("没有示例图片：请上传图片，或输入图片网址后点「打开网址」。")
            return False
        paths = [str(p) for p in self.examples]
        current = self.examples_dropdown.value
        nxt = paths[(paths.index(current) + 1) % len(paths)] if current in paths else paths[0]
        if nxt == current:  # a single example: reload it (the observer would not fire)
            return self.new_image(nxt, name=Path(nxt).name)
        self.examples_dropdown.value = nxt  # the observer loads it
        return True

    def _cleared_message(self) -> str:
        return "对话已清空，图片保留。"

    # ---- handlers
    def _example_label(self, path: Path) -> str:
        caption = _example_caption(path)
        return f"{path.name}  {caption[:18]}{'…' if len(caption) > 18 else ''}" if caption else path.name

    def _on_example(self, change) -> None:
        if change["new"]:
            self.new_image(change["new"], name=Path(change["new"]).name)

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        data, name = bytes(item["content"]), item.get("name") or "上传的图片"
        self.upload.value = ()  # the same file can be uploaded again
        self.new_image(data, name=name)

    def _on_url(self) -> None:
        if not self.url.value.strip():
            self._show_error("请先在框里输入图片网址（http:// 或 https:// 开头）或本地路径。")
            return
        self.new_image(self.url.value)

    # ---- loading (worker thread, or directly at construction)
    def _load_and_apply(self, source, label: str) -> None:
        what = f"图片 {label}"
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                image = _decode_upload(bytes(source), label)
            elif isinstance(source, dict):  # a FileUpload entry
                image = _decode_upload(bytes(source["content"]), source.get("name") or label)
            else:
                image = load_image(source if isinstance(source, Image.Image) else str(source))
        except Exception as e:
            self._show_error(_image_error(e, what))
            self._set_status("")
            return
        if self._stop_event.is_set():
            self._set_status("已取消加载图片。")
            return
        try:
            self.session.set_image(image)
        except Exception as e:
            self._show_error(_image_error(e, what))
            self._set_status("")
            return
        if not (isinstance(source, str) and source in {str(p) for p in self.examples}):
            self.examples_dropdown.value = ""  # not an example any more ("" loads nothing)
        self._render_history()
        self._show_image(image, label)
        self._set_status(f"已换成新图片 {label}，对话已重置。现在可以提问了。")

    def _show_image(self, image: Image.Image, label: str) -> None:
        self.image_name = label
        self.image.value = _thumbnail_bytes(image)
        self.image.layout.display = ""
        caption = ""
        for p in self.examples:
            if label in (p.name, self._example_label(p)):
                caption = _example_caption(p)
        ref = f'<br><span style="color:{_GREY};">参考描述：{_esc(caption)}</span>' if caption else ""
        self.image_caption.value = f"当前图片：{_esc(label)}{ref}"
