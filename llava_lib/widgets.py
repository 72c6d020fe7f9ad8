"""ipywidgets chat cells: ``TextChatWidget`` (01_qwen3_chat) and ``ImageChatWidget`` (05_llava_chat).

Generation and image loading run in a worker thread, so the kernel stays free to handle 停止 (it sets the event
``ChatSession.stream`` checks). The worker only assigns widget traits (JupyterLab renders them from any thread);
every error ends up in the widget's error line, not in a log."""
from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import ipywidgets as W

from .chat import ChatSession, load_image
from .data import FetchError, decode_image, reason_label
from .plots import thumbnail_jpeg
from .retrieval import read_examples

THUMBNAIL_SIZE = 320
_GREY = "#6b7280"
_BUBBLE = ("border-radius:12px;padding:6px 10px;margin:2px 0;white-space:pre-wrap;word-break:break-word;"
           "line-height:1.5;color:#111827;")
_THOUGHT_STYLE = (f"color:{_GREY};font-size:0.9em;white-space:pre-wrap;word-break:break-word;"
                  "border-left:3px solid #d1d5db;padding:2px 8px;margin:2px 0;")


def _grey(text: str, extra: str = "") -> str:
    return f'<span style="color:{_GREY};{extra}">{text}</span>'


# ----------------------------------------------------------------------------------------------- rendering
def _split(text: str) -> tuple[str, str, bool]:
    """(thinking, answer, still_thinking) of a (possibly partial) reply; ``<think>`` may have come from the template."""
    head, opened, rest = text.partition("<think>")
    if not opened and "</think>" not in text:
        return "", text, False
    thinking, closed, answer = (rest if opened else text).partition("</think>")
    return thinking.strip("\n"), (head + answer if opened else answer).lstrip("\n") if closed else "", not closed


def render_reply(text: str, *, streaming: bool = False, note: str = "") -> tuple[str, str]:
    """HTML of (thinking block, answer bubble) of one reply. The grey thinking block is open while the model is
    still thinking (the student watches it grow) and folded once the answer starts; ``note`` is added in grey."""
    thinking, answer, still_thinking = _split(text)
    live = streaming and still_thinking
    thought = ""
    if thinking.strip() or live:
        thought = (f'<details class="llava-chat-thought"{" open" if live else ""} style="{_THOUGHT_STYLE}">'
                   f'<summary style="cursor:pointer;color:{_GREY};">{"思考中…" if live else "思考过程（点击展开）"}'
                   f'</summary><div style="color:{_GREY};">{html.escape(thinking)}</div></details>')
    body = html.escape(answer)
    if streaming and not answer:
        body = _grey("（思考中）" if still_thinking else "…")
    if note:
        body += _grey(f"{' ' if answer else ''}（{html.escape(note)}）", "font-size:0.85em;")
    state = "llava-chat-streaming" if streaming else "llava-chat-done"
    return thought, f'<div class="llava-chat-bubble {state}" style="{_BUBBLE}background:#f3f4f6;">{body}</div>'


class _Message:
    """One chat row: the user's bubble on the right, or the thinking block and answer bubble on the left. The
    thinking block is its own widget so that a student's unfolding of it survives the answer's updates."""

    def __init__(self, role: str, text: str = "", streaming: bool = False):
        self.role = role
        self.thought = W.HTML(layout={"display": "none"}).add_class("llava-chat-thought")
        self.answer = W.HTML().add_class("llava-chat-answer")
        if role == "user":
            self.answer.value = (f'<div class="llava-chat-bubble" style="{_BUBBLE}background:#dbeafe;">'
                                 f'{html.escape(text)}</div>')
        else:
            self.update(text, streaming)
        self.row = W.HBox([W.VBox([self.thought, self.answer], layout={"max_width": "80%"})], layout={
            "justify_content": "flex-end" if role == "user" else "flex-start", "width": "100%"})
        self.row.add_class("llava-chat-message").add_class(f"llava-chat-{role}")

    def update(self, text: str, streaming: bool = False, note: str = "") -> None:
        """Assigns trait values only (an unchanged value sends nothing to the browser)."""
        self.thought.value, self.answer.value = render_reply(text, streaming=streaming, note=note)
        self.thought.layout.display = "" if self.thought.value else "none"

    @property
    def html(self) -> str:
        return self.thought.value + self.answer.value

    def close(self) -> None:
        for w in (self.thought, self.answer, *self.row.children, self.row):
            w.close()


# ----------------------------------------------------------------------------------------------- base
class _ChatWidgetBase:
    """History, question box, 发送/停止/清空, status and error lines, and the worker thread."""

    refresh_interval = 0.05  # seconds between two redraws of the streamed bubble (every piece still arrives)
    halt_timeout = 10.0  # how long 清空 / 换新图片 wait for a stopped worker
    clear_label = "清空"
    cleared_message = "对话已清空。"

    def __init__(self, session: ChatSession):
        self.session = session
        self.last_pieces: list[str] = []  # the pieces of the last reply, as streamed
        self.error = self.status = ""
        self._worker: threading.Thread | None = None
        self._task = ""
        self._stop_event = threading.Event()
        self._messages: list[_Message] = []

        self.history_box = W.VBox([], layout={"width": "100%"}).add_class("llava-chat-history")
        # column-reverse around one child keeps the scroll position at the newest message
        self.history_scroll = W.Box([self.history_box], layout=W.Layout(
            flex_flow="column-reverse", overflow="auto", max_height="460px", min_height="120px",
            border="1px solid #e5e7eb", padding="6px", width="100%"))
        self.question = W.Textarea(placeholder="输入问题，然后点「发送」", rows=2,
                                   layout={"width": "100%"}).add_class("llava-chat-input")
        self.send_button = self._button("发送", "llava-chat-send", self.send, "primary", "把问题发给模型")
        self.stop_button = self._button("停止", "llava-chat-stop", self.stop, "warning", "停止正在生成的回答")
        self.stop_button.disabled = True
        self.clear_button = self._button(self.clear_label, "llava-chat-clear", self.clear, "", "清空对话记录")
        self.status_line = W.HTML().add_class("llava-chat-status")
        self.error_line = W.HTML().add_class("llava-chat-error")
        self._render_history()

    @property
    def busy(self) -> bool:
        """True while a reply is generated (or an image loaded) in the worker thread."""
        return self._worker is not None and self._worker.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Join the worker; True when it has finished (False: still running after ``timeout`` seconds)."""
        if self._worker is not None:
            self._worker.join(timeout)
        return not self.busy

    @property
    def history(self) -> list[dict]:
        return list(self.session.history)  # what the model sees next time

    @property
    def history_html(self) -> str:
        """The HTML of the chat bubbles, as the browser shows them (with the reply being streamed)."""
        return "".join(m.html for m in self._messages)

    @property
    def last_reply(self) -> str:
        return "".join(self.last_pieces)

    def send(self, question: str | None = None) -> bool:
        """Ask ``question`` (default: the text box) in the worker thread; False if refused (busy or empty)."""
        text = (self.question.value if question is None else question).strip()
        if self.busy:
            self._show_error("正在加载图片，请等它完成（或点「停止」取消）后再发送。" if self._task == "image"
                             else "上一条回答还在生成中：请等它完成，或先点「停止」，再发送新问题。")
            return False
        if not text:
            self._show_error("请先在输入框里写一个问题，再点「发送」。")
            return False
        if question is None:
            self.question.value = ""
        user, bot = _Message("user", text), _Message("assistant", streaming=True)
        self._show_messages(self._messages + [user, bot])
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
        self._show_error("")
        self._set_status(self.cleared_message)
        return True

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _start(self, task: str, target, *args) -> None:
        self._show_error("")
        self._stop_event = threading.Event()
        self._task = task

        def run():
            self._guard(target)(*args)  # last resort: the targets report their own errors
            self.stop_button.disabled = True
        self._worker = threading.Thread(target=run, name=f"llava-chat-{task}", daemon=True)
        self.stop_button.disabled = False
        self._worker.start()

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
        self.last_pieces = pieces = []
        text, last_update = "", 0.0
        try:
            for piece in self.session.stream(question, stop_event=self._stop_event):
                pieces.append(piece)
                text += piece
                if time.monotonic() - last_update >= self.refresh_interval:
                    bot.update(text, streaming=True)
                    last_update = time.monotonic()
        except Exception as e:
            bot.update(text, note="生成出错")
            self._show_error(f"生成失败：{type(e).__name__}: {e}。请检查模型是否已正确加载（或显存是否不足），"
                             f"然后重新发送；也可以先点「{self.clear_label}」。")
            self._set_status("")
            if len(self.session.history) == before:  # failed before the turn was recorded: take the bubbles out
                self._show_messages([m for m in self._messages if m not in (user, bot)])
                self.question.value = self.question.value or question
                return
        else:
            note = ""
            if self._stop_event.is_set():
                note = "已停止"
            elif getattr(self.session, "finish_reason", None) == "length":
                note = "思考被截断：达到最大生成长度，还没有回答" if _split(text)[2] else "回答被截断：达到最大生成长度"
            bot.update(text, note=note)
            self._set_status(f"{note}。" if note else "回答完成。")
        if len(self.session.history) != before + 2:
            self._render_history()

    def _show_messages(self, messages: list[_Message]) -> None:
        dropped = [m for m in self._messages if m not in messages]
        self._messages = messages
        self.history_box.children = tuple(m.row for m in messages)
        for m in dropped:
            m.close()

    def _render_history(self) -> None:
        self._show_messages([_Message(t["role"], t.get("content") or "") for t in self.session.history
                             if t.get("role") in ("user", "assistant")])

    def _set_status(self, text: str) -> None:
        self.status = text
        self.status_line.value = _grey(html.escape(text)) if text else ""

    def _show_error(self, text: str) -> None:
        self.error = text
        self.error_line.value = (f'<span style="color:#b91c1c;font-weight:600;">⚠ {html.escape(text)}</span>'
                                 if text else "")

    def _guard(self, handler):
        """Wrap a widget callback so that an exception shows in the error line instead of the kernel's log."""
        def wrapped(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as e:
                self._show_error(f"操作失败：{type(e).__name__}: {e}。请重试；如果一直出错，请重新运行这个单元格。")
        return wrapped

    def _button(self, description: str, css: str, action, style: str, tooltip: str) -> W.Button:
        button = W.Button(description=description, button_style=style, tooltip=tooltip, layout={"width": "auto"})
        button.on_click(self._guard(lambda _: action()))
        return button.add_class(css)

    def _chat_column(self) -> list:
        return [self.history_scroll, self.question, W.HBox([self.send_button, self.stop_button, self.clear_button]),
                self.status_line, self.error_line]


# ----------------------------------------------------------------------------------------------- text chat
class TextChatWidget(_ChatWidgetBase):
    """Chat with the text-only Qwen3 (01_qwen3_chat): system prompt, thinking switch, streamed bubbles.
    ``TextChatWidget(session)`` as a cell's last line shows it; ``session`` is a :class:`llava_lib.chat.ChatSession`."""

    def __init__(self, session: ChatSession):
        super().__init__(session)
        self.system_box = W.Textarea(value=session.system or "", rows=2, layout={"width": "100%"},
                                     placeholder="系统提示词（可选），例如：你是一位耐心的中文助教，回答简洁。"
                                     ).add_class("llava-chat-system")
        self.thinking = W.ToggleButton(value=bool(session.enable_thinking), description="思考模式",
                                       button_style="success" if session.enable_thinking else "",
                                       tooltip="打开后模型先思考再回答；思考内容折叠显示为灰色"
                                       ).add_class("llava-chat-thinking")
        self.system_box.observe(self._guard(self._on_system), "value")
        self.thinking.observe(self._guard(self._on_thinking), "value")
        self.widget = W.VBox([W.HTML("<b>系统提示词</b>"), self.system_box, self.thinking, *self._chat_column()],
                             layout={"width": "100%", "max_width": "900px"}).add_class("llava-chat")
        self.widget.add_class("llava-text-chat")

    def _on_system(self, change) -> None:
        self.session.system = change["new"].strip() or None

    def _on_thinking(self, change) -> None:
        self.session.enable_thinking = bool(change["new"])
        self.thinking.button_style = "success" if change["new"] else ""
        self._set_status("思考模式已打开：模型会先思考（灰色折叠部分）再回答。" if change["new"]
                         else "思考模式已关闭。")


# ----------------------------------------------------------------------------------------------- image chat
def _hint(reason: str) -> str:
    """What the student can do about an image that failed to load (the error itself names the problem)."""
    if reason in ("not_found", "read_error"):
        return "请检查路径和文件权限，或改用示例图片 / 上传图片。"
    if reason == "bad_url":
        return "请输入以 http:// 或 https:// 开头的图片网址，或本地图片路径。"
    if reason.startswith("http_4"):
        return "网址可能已失效，请换一个图片网址。"
    if reason in ("timeout", "connection", "incomplete") or reason.startswith("http_5"):
        return "网络或服务器出错，请稍后重试或换一个网址。"
    return "请换一张完整的、不太大的 JPG 或 PNG 图片。"


class ImageChatWidget(_ChatWidgetBase):
    """Chat about an image (05_llava_chat): pick an example, upload or give a URL; multi-turn, streamed.
    Loading an image runs in the worker thread too (a URL can be slow): :meth:`wait` before reading the result."""

    clear_label = "清空（保留图片）"
    cleared_message = "对话已清空，图片保留。"

    def __init__(self, session: ChatSession, example_dir=None):
        super().__init__(session)
        self.clear_button.tooltip = "清空对话记录，图片保留"
        self.examples: list[Path] = []
        self.captions: dict[str, str] = {}  # example file name -> its reference caption
        if example_dir is not None:
            try:
                found = read_examples(example_dir)
                self.examples, self.captions = found.paths, dict(zip(found.names, found.captions))
            except FileNotFoundError as e:
                self._show_error(f"{e}也可以直接上传图片或输入网址。")

        self.image = W.Image(format="jpeg", layout={"max_width": f"{THUMBNAIL_SIZE}px", "display": "none"}
                             ).add_class("llava-chat-image")
        self.image_caption = W.HTML().add_class("llava-chat-image-caption")
        options = [("（选择示例图片）", "")] + [
            (f"{p.name}  {c[:18]}{'…' if len(c) > 18 else ''}" if (c := self.captions[p.name]) else p.name, str(p))
            for p in self.examples]
        first = str(self.examples[0]) if self.examples and session.image is None else ""
        self.examples_dropdown = W.Dropdown(options=options, value=first, description="示例图片",
                                            disabled=not self.examples, layout={"width": "100%"}
                                            ).add_class("llava-chat-examples")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="上传图片").add_class("llava-chat-upload")
        self.url = W.Text(placeholder="图片网址（http/https）或本地路径", layout={"width": "100%"}).add_class("llava-chat-url")
        self.url_button = self._button("打开网址", "llava-chat-url-load", lambda: self.new_image(self.url.value), "",
                                       "加载上面网址或路径的图片（会重置对话）")
        self.new_image_button = self._button("换新图片（重置对话）", "llava-chat-new-image", self.next_example, "info",
                                             "换到下一张示例图片，并清空对话")
        self.examples_dropdown.observe(self._guard(self._on_example), "value")
        self.upload.observe(self._guard(self._on_upload), "value")

        if session.image is not None:
            self._show_image(session.image, "当前图片")
        elif first:  # start with the first example, loaded here (a local file: fast)
            self._load_and_apply(first, self.examples[0].name)
        else:
            self.image_caption.value = _grey("还没有图片：请选择示例图片、上传图片或输入网址。")
        sources = W.VBox([self.image, self.image_caption, self.examples_dropdown, self.upload,
                          W.HBox([self.url, self.url_button]), self.new_image_button],
                         layout={"width": f"{THUMBNAIL_SIZE + 20}px", "min_width": "240px"})
        chat = W.VBox(self._chat_column(), layout={"flex": "1 1 auto", "min_width": "300px"})
        self.widget = W.HBox([sources, chat], layout={"width": "100%", "flex_flow": "row wrap"}).add_class("llava-chat")
        self.widget.add_class("llava-image-chat")

    def new_image(self, source, name: str | None = None) -> bool:
        """Load ``source`` (path, URL, bytes of an uploaded file, PIL image) in the worker and start a new
        conversation with it; False if it could not start. On failure the old image and history stay."""
        if isinstance(source, str):
            source = source.strip()
        if source is None or source == "":
            self._show_error("请先选择示例图片、上传图片，或在框里输入图片网址（http:// 或 https:// 开头）或本地路径。")
            return False
        if not self._halt():
            return False
        label = name or (Path(source).name if isinstance(source, (str, Path)) else "图片")
        self._start("image", self._load_and_apply, source, label)
        self._set_status(f"正在加载图片 {label} …")
        return True

    def next_example(self) -> bool:
        """Switch to the next example image (wraps around); resets the conversation."""
        if not self.examples:
            self._show_error("没有示例图片：请上传图片，或输入图片网址后点「打开网址」。")
            return False
        current = self.examples_dropdown.index  # 0: the placeholder
        if len(self.examples) == current == 1:  # a single example: reload it (the observer would not fire)
            return self.new_image(str(self.examples[0]))
        self.examples_dropdown.index = current % len(self.examples) + 1  # the observer loads it
        return True

    def _on_example(self, change) -> None:
        if change["new"]:
            self.new_image(change["new"])

    def _on_upload(self, change) -> None:
        if change["new"]:
            item = change["new"][0]
            self.upload.value = ()  # the same file can be uploaded again
            self.new_image(bytes(item["content"]), name=item.get("name") or "上传的图片")

    def _load_and_apply(self, source, label: str) -> None:
        """Runs in the worker thread, or directly at construction."""
        try:
            image = decode_image(source, label) if isinstance(source, bytes) else load_image(source)
            if self._stop_event.is_set():
                self._set_status("已取消加载图片。")
                return
            self.session.set_image(image)
        except Exception as e:
            why = (f"{e.message}（{reason_label(e.reason)}）。{_hint(e.reason)}" if isinstance(e, FetchError)
                   else f"{type(e).__name__}: {e}。请换一张 JPG/PNG 图片，或检查网址/路径后重试。")
            self._show_error(f"无法加载图片 {label}：{why}当前的图片和对话保持不变。")
            self._set_status("")
            return
        if source not in map(str, self.examples):
            self.examples_dropdown.value = ""  # not an example any more ("" loads nothing)
        self._render_history()
        self._show_image(image, label)
        self._set_status(f"已换成新图片 {label}，对话已重置。现在可以提问了。")

    def _show_image(self, image, label: str) -> None:
        self.image.value = thumbnail_jpeg(image, THUMBNAIL_SIZE)
        self.image.layout.display = ""
        caption = self.captions.get(label, "")
        ref = "<br>" + _grey(f"参考描述：{html.escape(caption)}") if caption else ""
        self.image_caption.value = f"当前图片：{html.escape(label)}{ref}"
