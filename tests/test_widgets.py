"""The chat widgets driven headlessly: streamed replies reach the history, 停止 ends early, 清空 empties, bad images
and model errors show in the widget and leave the session usable, thinking is folded and grey, busy is refused.

No real model: ``FakeSession`` is a ``ChatSession`` whose ``stream`` yields a scripted reply with small sleeps
(and honours ``stop_event`` like the real one); one test runs the real ``ChatSession.stream`` over a scripted LLM.
Every wait is bounded.
"""
from __future__ import annotations

import http.server
import io
import threading
import time

import pytest
from PIL import Image

from llava_lib.chat import ChatSession
from llava_lib.widgets import ImageChatWidget, TextChatWidget, render_reply

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # seconds: upper bound for any worker in these tests
REPLY = "你好！我是一个小助手，可以回答问题。"
THOUGHT = "用户在打招呼，我应该礼貌地回应。"


class FakeSession(ChatSession):
    """ChatSession with a scripted ``stream``: one character per piece, ``delay`` seconds apart."""

    def __init__(self, reply=REPLY, delay=0.0, fail=None, **kwargs):
        super().__init__(model=None, tokenizer=None, **kwargs)
        self.reply, self.delay, self.fail = reply, delay, fail
        self.yielded: list[str] = []
        self.threads: list[threading.Thread] = []
        self.questions: list[str] = []

    def script(self) -> str:
        return f"<think>\n{THOUGHT}\n</think>\n\n{self.reply}" if self.enable_thinking else self.reply

    def stream(self, question, stop_event=None):
        self.threads.append(threading.current_thread())
        self.questions.append(question)
        if self.fail == "before":
            raise RuntimeError("模型没有加载")
        pieces = []
        try:
            for ch in self.script():
                if stop_event is not None and stop_event.is_set():
                    return
                time.sleep(self.delay)
                pieces.append(ch)
                self.yielded.append(ch)
                yield ch
                if self.fail == "during" and len(pieces) == 3:
                    raise RuntimeError("CUDA out of memory")
        finally:
            self.history += [{"role": "user", "content": question},
                             {"role": "assistant", "content": "".join(pieces)}]


def wait_until(cond, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def ask(widget, text):
    widget.question.value = text
    assert widget.send() is True
    assert widget.wait(WAIT), "worker did not finish"


def image_bytes(color, fmt="PNG", size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def example_dir(tmp_path):
    d = tmp_path / "data_example"
    d.mkdir()
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (224, 224), color).save(d / f"{i:04d}.jpg")
        (d / f"{i:04d}.txt").write_text(f"一张纯色图片，编号 {i}\n", encoding="utf-8")
    return d


def upload_state(name, data, mime):
    """What the browser sends when a file is picked (goes through FileUpload's deserializer)."""
    return {"value": [{"name": name, "type": mime, "size": len(data), "content": memoryview(data),
                       "last_modified": 0}]}


# ----------------------------------------------------------------------------------------------- text chat
def test_send_streams_reply_into_history():
    session = FakeSession(delay=0.005)
    w = TextChatWidget(session)
    w.question.value = "你好"
    assert w.send() is True
    assert w.question.value == ""  # the box is emptied for the next question
    assert w.busy
    assert w.wait(WAIT) and not w.busy
    assert session.threads[0] is not threading.main_thread()  # generation ran off the main thread
    assert w.history == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": REPLY}]
    assert len(w.last_pieces) == len(REPLY) > 1 and "".join(w.last_pieces) == REPLY == w.last_reply
    assert "你好" in w.history_html and REPLY in w.history_html and "llava-chat-done" in w.history_html
    assert [m.role for m in w._messages] == ["user", "assistant"]
    assert w.error == "" and "完成" in w.status
    assert w.stop_button.disabled


def test_streamed_bubble_grows_while_generating():
    w = TextChatWidget(FakeSession(delay=0.02))
    w.refresh_interval = 0.0
    w.question.value = "你好"
    w.send()
    wait_until(lambda: "llava-chat-streaming" in w.history_html and REPLY[:3] in w.history_html,
               what="a partial reply in the bubble")
    assert REPLY not in w.history_html  # not all there yet: streamed, not written at the end
    assert w.wait(WAIT)
    assert REPLY in w.history_html


def test_multi_turn_and_html_is_escaped():
    session = FakeSession(reply="<b>粗体</b> & 1 < 2")
    w = TextChatWidget(session)
    ask(w, "第一问 <script>alert(1)</script>")
    ask(w, "第二问")
    assert len(w.history) == 4 and session.questions == ["第一问 <script>alert(1)</script>", "第二问"]
    assert "<script>" not in w.history_html and "&lt;script&gt;" in w.history_html
    assert "<b>粗体</b>" not in w.history_html and "&lt;b&gt;粗体&lt;/b&gt; &amp; 1 &lt; 2" in w.history_html
    assert len(w.history_box.children) == 4


def test_stop_ends_generation_early():
    reply = "这是一个很长的回答，" * 10
    session = FakeSession(reply=reply, delay=0.03)
    w = TextChatWidget(session)
    w.question.value = "讲个长故事"
    w.send()
    wait_until(lambda: len(session.yielded) >= 3, what="the first pieces")
    t0 = time.monotonic()
    assert w.stop() is True
    assert w.wait(2.0), "stop did not end the worker"
    assert time.monotonic() - t0 < 2.0
    pieces = w.last_pieces
    assert 3 <= len(pieces) < len(reply)
    assert w.history[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert "已停止" in w.history_html and "已停止" in w.status
    assert w.stop() is False  # nothing left to stop


def test_clear_empties_history_also_while_generating():
    session = FakeSession(delay=0.0)
    w = TextChatWidget(session)
    ask(w, "你好")
    assert w.history and w.history_html
    w.clear_button.click()
    assert w.history == [] and session.history == [] and w.history_html == "" and w.history_box.children == ()
    session.delay = 0.05
    w.question.value = "再来一次"
    w.send()
    wait_until(lambda: len(session.yielded) > len(REPLY), what="the second reply to start")
    assert w.clear() is True  # stops the reply, then clears
    assert not w.busy and w.history == [] and w.history_html == ""


def test_sending_while_busy_is_refused():
    session = FakeSession(delay=0.03)
    w = TextChatWidget(session)
    ask_text = "第一问"
    w.question.value = ask_text
    w.send()
    w.question.value = "第二问"
    assert w.send() is False
    assert "生成中" in w.error and "停止" in w.error  # a visible message with what to do
    assert "生成中" in w.error_line.value
    assert w.question.value == "第二问"  # not lost
    w.stop()
    assert w.wait(WAIT)
    assert w.send() is True and w.error == ""  # refused text is sent now
    assert w.wait(WAIT)
    assert session.questions == ["第一问", "第二问"]


def test_empty_question_is_refused():
    session = FakeSession()
    w = TextChatWidget(session)
    w.question.value = "   "
    assert w.send() is False
    assert "问题" in w.error and not w.busy and session.questions == []


def test_thinking_is_folded_and_grey_when_switched_on():
    session = FakeSession()
    w = TextChatWidget(session)
    assert session.enable_thinking is False
    w.thinking.value = True
    assert session.enable_thinking is True
    ask(w, "你好")
    bubble = w._messages[-1]
    thought, answer = bubble.thought.value, bubble.answer.value
    assert '<details class="llava-chat-thought"' in thought and " open" not in thought  # folded
    assert "color:#6b7280" in thought and THOUGHT in thought  # grey
    assert bubble.thought.layout.display != "none"
    assert THOUGHT not in answer and "think>" not in answer and REPLY in answer
    assert w.history[-1]["content"].startswith("<think>")  # the session keeps the raw reply
    w.thinking.value = False
    ask(w, "再见")
    assert session.enable_thinking is False
    assert w._messages[-1].thought.value == "" and w._messages[-1].thought.layout.display == "none"


def test_render_reply_states():
    thought, answer = render_reply("<think>\n先想", streaming=True)
    assert "<details" in thought and " open" in thought and "思考中" in thought  # live: open
    assert "llava-chat-streaming" in answer
    thought, answer = render_reply("<think>\n想好了\n</think>\n\n答案", streaming=False)
    assert " open" not in thought and "想好了" in thought and "答案" in answer and "想好了" not in answer
    thought, answer = render_reply("想好了</think>\n答案")  # template opened the block itself
    assert "想好了" in thought and answer.count("答案") == 1 and "想好了" not in answer
    thought, answer = render_reply("<think>\n\n</think>\n\n答案")  # empty thinking: no block
    assert thought == "" and "答案" in answer


def test_system_prompt_box_sets_session_system():
    session = FakeSession(system="旧的")
    w = TextChatWidget(session)
    assert w.system_box.value == "旧的"
    w.system_box.value = "你是一位耐心的助教。"
    assert session.system == "你是一位耐心的助教。"
    w.system_box.value = "  "
    assert session.system is None


@pytest.mark.parametrize("when", ["before", "during"])
def test_model_error_is_shown_and_session_stays_usable(when):
    session = FakeSession(fail=when)
    w = TextChatWidget(session)
    ask(w, "你好")
    assert "生成失败" in w.error and "RuntimeError" in w.error and "重新发送" in w.error
    assert "生成失败" in w.error_line.value
    if when == "before":  # nothing recorded: the bubbles go, the question comes back to the box
        assert w.history == [] and w.history_html == "" and w.question.value == "你好"
    else:  # the partial turn is recorded and marked
        assert w.history[-1]["content"] == REPLY[:3] and "生成出错" in w.history_html
    session.fail = None
    ask(w, "再试一次")
    assert w.error == "" and w.history[-1] == {"role": "assistant", "content": REPLY}


def test_exception_in_a_button_callback_is_shown():
    class Broken(FakeSession):
        def clear(self):
            raise OSError("磁盘坏了")

    w = TextChatWidget(Broken())
    w.clear_button.click()
    assert "操作失败" in w.error and "磁盘坏了" in w.error


def test_css_classes_for_the_browser_test():
    w = TextChatWidget(FakeSession())
    classes = {
        "llava-chat": w.widget, "llava-chat-input": w.question, "llava-chat-send": w.send_button,
        "llava-chat-stop": w.stop_button, "llava-chat-clear": w.clear_button, "llava-chat-history": w.history_box,
        "llava-chat-thinking": w.thinking, "llava-chat-system": w.system_box, "llava-chat-error": w.error_line,
        "llava-chat-status": w.status_line,
    }
    for css, widget in classes.items():
        assert css in widget._dom_classes, css
    assert [w.send_button.description, w.stop_button.description, w.clear_button.description] == ["发送", "停止", "清空"]
    assert w.thinking.description == "思考模式"
    assert w._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]["model_id"] == w.widget.model_id


def test_real_chat_session_is_stopped_through_the_event(qwen_tokenizer):
    """The real ChatSession.stream over a tiny Qwen3: 停止 reaches transformers' generate (its stopping criteria);
    a reply that reaches max_new_tokens is marked as cut off."""
    from conftest import tiny_llava
    model = tiny_llava(qwen_tokenizer)
    steps: list[int] = []
    model.llm.register_forward_pre_hook(lambda module, args: (steps.append(1), time.sleep(0.03)) and None)
    # min_new_tokens: the random model must not end early by drawing an end token
    session = ChatSession(model, qwen_tokenizer, generation={"do_sample": False, "max_new_tokens": 300,
                                                             "min_new_tokens": 300})
    w = TextChatWidget(session)
    w.question.value = "长一点"
    w.send()
    wait_until(lambda: len(steps) >= 5, what="the first tokens")
    w.stop()
    assert w.wait(2.0)
    assert w.error == "", w.error
    assert 5 <= len(steps) < 100 and session.finish_reason == "stopped"
    assert w.history[-1]["content"] == w.last_reply
    assert "已停止" in w.history_html and "已停止" in w.status

    session.generation = {"do_sample": False, "max_new_tokens": 4, "min_new_tokens": 4}
    steps.clear()
    ask(w, "短一点")
    assert len(steps) == 4 and session.finish_reason == "length"
    assert "回答被截断" in w.history_html and "回答被截断" in w.status


# ----------------------------------------------------------------------------------------------- image chat
def test_image_widget_starts_with_first_example(example_dir):
    session = FakeSession()
    w = ImageChatWidget(session, example_dir=example_dir)
    assert session.image is not None and session.image.getpixel((10, 10))[0] > 200  # 0000.jpg is red
    assert w.examples_dropdown.value == str(example_dir / "0000.jpg")
    assert len(w.examples_dropdown.options) == 4  # placeholder + 3
    assert w.image.value[:2] == b"\xff\xd8" and w.image.layout.display != "none"
    assert "0000.jpg" in w.image_caption.value and "编号 0" in w.image_caption.value
    assert w.clear_button.description == "清空（保留图片）"
    assert w.new_image_button.description == "换新图片（重置对话）"
    for css in ("llava-chat-history", "llava-chat-input", "llava-chat-send", "llava-chat-stop", "llava-chat-clear",
                "llava-chat-error", "llava-chat-image", "llava-chat-examples", "llava-chat-upload", "llava-chat-url",
                "llava-chat-url-load", "llava-chat-new-image"):
        assert any(css in x._dom_classes for x in (
            w.history_box, w.question, w.send_button, w.stop_button, w.clear_button, w.error_line, w.image,
            w.examples_dropdown, w.upload, w.url, w.url_button, w.new_image_button)), css
    assert w.error == ""


def test_image_chat_multi_turn_clear_keeps_image_new_image_resets(example_dir):
    session = FakeSession(delay=0.002)
    w = ImageChatWidget(session, example_dir=example_dir)
    first = session.image
    ask(w, "图里是什么颜色？")
    ask(w, "还有别的吗？")
    assert len(w.history) == 4 and REPLY in w.history_html
    w.clear_button.click()
    assert w.history == [] and w.history_html == "" and session.image is first and "图片保留" in w.status
    ask(w, "再问一次")
    w.new_image_button.click()  # next example, conversation reset
    assert w.wait(WAIT)
    assert w.examples_dropdown.value == str(example_dir / "0001.jpg")
    assert session.image is not first and session.image.getpixel((10, 10))[1] > 100  # green
    assert w.history == [] and w.history_html == "" and "0001.jpg" in w.image_caption.value
    w.examples_dropdown.value = str(example_dir / "0002.jpg")  # picking in the dropdown loads at once
    assert w.wait(WAIT) and session.image.getpixel((10, 10))[2] > 200
    ask(w, "这张呢？")
    assert len(w.history) == 2


def test_bad_url_shows_error_and_session_stays_usable(example_dir):
    session = FakeSession()
    w = ImageChatWidget(session, example_dir=example_dir)
    ask(w, "第一问")
    image = session.image
    w.url.value = "ftp://example.invalid/cat.jpg"
    w.url_button.click()
    assert w.wait(WAIT)
    assert "无法加载" in w.error and "http" in w.error and "无法加载" in w.error_line.value
    assert session.image is image and len(w.history) == 2  # old image and conversation kept
    assert w.new_image(str(example_dir / "missing.jpg")) and w.wait(WAIT)
    assert "不存在" in w.error and "路径" in w.error
    ask(w, "第二问")  # still usable; the error is cleared by a successful send
    assert w.error == "" and len(w.history) == 4 and w.history[-1]["content"] == REPLY


def test_http_404_url_shows_error(example_dir):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/ok.png":
                body = image_bytes("yellow")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        session = FakeSession()
        w = ImageChatWidget(session, example_dir=example_dir)
        w.url.value = f"{base}/gone.jpg"
        w.url_button.click()
        assert w.wait(WAIT)
        assert "404" in w.error and "换一个" in w.error
        w.url.value = f"{base}/ok.png"
        w.url_button.click()
        assert w.wait(WAIT)
        assert w.error == "" and session.image.getpixel((1, 1))[:2] == (255, 255)
        assert w.examples_dropdown.value == ""  # no longer showing an example
    finally:
        server.shutdown()
        server.server_close()


def test_non_image_upload_shows_error_and_session_stays_usable(example_dir):
    session = FakeSession()
    w = ImageChatWidget(session, example_dir=example_dir)
    ask(w, "第一问")
    image = session.image
    w.upload.set_state(upload_state("笔记.txt", "这不是图片".encode(), "text/plain"))
    assert w.wait(WAIT)
    assert "笔记.txt" in w.error and "不是" in w.error and "JPG" in w.error
    assert session.image is image and len(w.history) == 2
    assert w.upload.value == ()  # ready for the next upload
    w.upload.set_state(upload_state("坏图.jpg", image_bytes("red", "JPEG")[:200], "image/jpeg"))  # truncated
    assert w.wait(WAIT) and "坏图.jpg" in w.error and session.image is image
    ask(w, "第二问")
    assert w.error == "" and len(w.history) == 4


def test_image_upload_replaces_image_and_resets(example_dir):
    session = FakeSession()
    w = ImageChatWidget(session, example_dir=example_dir)
    ask(w, "第一问")
    w.upload.set_state(upload_state("猫.png", image_bytes((0, 0, 255)), "image/png"))
    assert w.wait(WAIT)
    assert w.error == "" and session.image.getpixel((1, 1)) == (0, 0, 255)
    assert w.history == [] and "猫.png" in w.image_caption.value and "猫.png" in w.status
    ask(w, "这是什么？")
    assert len(w.history) == 2


def test_new_image_while_generating_stops_the_reply(example_dir):
    session = FakeSession(reply="很长的回答。" * 30, delay=0.02)
    w = ImageChatWidget(session, example_dir=example_dir)
    w.question.value = "讲讲这张图"
    w.send()
    wait_until(lambda: len(session.yielded) >= 2, what="the reply to start")
    assert w.new_image(str(example_dir / "0002.jpg")) is True
    assert w.wait(WAIT)
    assert w.history == [] and session.image.getpixel((10, 10))[2] > 200 and len(session.yielded) < 180


def test_image_widget_without_examples(tmp_path):
    session = FakeSession()
    w = ImageChatWidget(session)  # no example_dir
    assert session.image is None and w.examples_dropdown.disabled and w.error == ""
    assert "还没有图片" in w.image_caption.value
    assert w.next_example() is False and "上传" in w.error
    w = ImageChatWidget(FakeSession(), example_dir=tmp_path / "nowhere")
    assert "没有找到示例图片" in w.error
    w.url.value = ""
    w.url_button.click()
    assert "网址" in w.error and not w.busy
    ask(w, "没有图片也能聊天吗？")  # text-only still works
    assert w.history[-1]["content"] == REPLY
