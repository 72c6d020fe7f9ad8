"""The chat cells as a student sees them: a real JupyterLab, driven in headless Chromium (Playwright).

One ``jupyter lab`` (127.0.0.1, free port, random token) serves a temporary copy of ``notebooks/``; Debian's
``/usr/bin/chromium`` opens each notebook, runs Run > Run All Cells, types a question into the chat widget,
presses 发送, waits (bounded) for the streamed reply, takes a screenshot of the chat cell and presses 清空.

* ``test_chat_widget_in_jupyterlab``: a throwaway notebook with a scripted ``ChatSession`` (no model): the widget
  frontend works (widget manager, streamed updates from the worker thread, thinking block, Clear).
* ``test_qwen3_chat_notebook``: ``01_qwen3_chat.ipynb`` on the mini world, thinking switch on.
* ``test_llava_chat_notebook``: ``05_llava_chat.ipynb`` on the mini world, with a projection trained the way
  ``04_stage1_training`` saves it (a short run, into the server's ``LLAVA_CHECKPOINTS_DIR``).

Screenshots go to ``test-artifacts/browser/`` (printed); a failure names the step, shows what was on screen and
where its screenshot is. ``LLAVA_UPDATE_SCREENSHOTS=1`` also refreshes ``docs/screenshots/05_llava_chat.png``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from browser_harness import JupyterLab, LabPage, launch_chromium, small_png

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
README_SHOT = REPO / "docs" / "screenshots" / "05_llava_chat.png"
VIEWPORT = {"width": 1280, "height": 1100}
# Training steps of the projection 05 loads: a few are enough for a fluent reply (LLAVA_BROWSER_STAGE1_STEPS=150,
# as in 04_stage1_training, gives the README screenshot a well-trained model)
STAGE1_STEPS = int(os.environ.get("LLAVA_BROWSER_STAGE1_STEPS", "4"))

FAKE_CHAT = '''import time
from llava_lib.chat import ChatSession
from llava_lib.widgets import TextChatWidget


class ScriptedSession(ChatSession):
    """A ChatSession without a model: stream() yields a scripted reply piece by piece."""

    def __init__(self, **kwargs):
        super().__init__(model=None, tokenizer=None, **kwargs)

    def stream(self, question, stop_event=None):
        pieces = ["<think>", "\\n用户在打招呼，", "简单回应即可。", "\\n</think>", "\\n\\n"] if self.enable_thinking else []
        pieces += ["你好", "！", "我是", "脚本", "助手。"]
        out = []
        try:
            for piece in pieces:
                if stop_event is not None and stop_event.is_set():
                    return
                time.sleep(0.15)
                out.append(piece)
                yield piece
        finally:
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(out)}]


TextChatWidget(ScriptedSession(system="你是一位耐心的中文助教。"))
'''


def _say(request, line: str) -> None:
    """Print past pytest's output capture (so the line shows in a normal ``pytest -q`` run)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print(line, flush=True)


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    """(server, browser, workdir): jupyter lab over a copy of notebooks/ plus a scripted-chat notebook."""
    pytest.importorskip("playwright", reason="浏览器测试需要 playwright（pip install -e .[dev]）")
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("browser")
    root = work / "root"
    shutil.copytree(REPO / "notebooks", root / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "*.ipynb.*"))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 浏览器测试：脚本聊天"),
                                         nbformat.v4.new_code_cell(FAKE_CHAT)])
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(nb, root / "scripted_chat.ipynb")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    _say(request, f"\n[browser] 截图目录：{ARTIFACTS}")
    if shutil.which("fc-list") and not subprocess.run(["fc-list", ":lang=zh"], capture_output=True,
                                                       text=True).stdout.strip():
        _say(request, "[browser] 注意：没有中文字体，截图里的中文会显示成方框（apt-get install -y fonts-wqy-microhei）")

    env = {"LLAVA_CHECKPOINTS_DIR": str(work / "checkpoints")}  # where 05 looks for 04's projection
    with JupyterLab(root, work, env=env) as server, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            yield server, browser, work
        finally:
            with contextlib.suppress(Exception):
                browser.close()


@contextlib.contextmanager
def _notebook_page(lab, name: str):
    server, browser, _ = lab
    t0 = time.monotonic()
    context = browser.new_context(viewport=VIEWPORT, locale="zh-CN")
    ui = None
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        ui = LabPage(page, server, ARTIFACTS, name)
        yield ui
    finally:
        with contextlib.suppress(Exception):
            context.close()
        with contextlib.suppress(Exception):  # free the kernel's memory and CPU for the next notebook
            for k in server.kernels():
                server.api("DELETE", f"api/kernels/{k['id']}", timeout=15)
        print(f"[browser] {name}: {time.monotonic() - t0:.1f} s")
        for step, seconds in getattr(ui, "timings", []):
            print(f"    {seconds:6.1f} s  {step}")


@pytest.mark.timeout(150)
def test_chat_widget_in_jupyterlab(lab):
    with _notebook_page(lab, "scripted_chat") as ui:
        ui.open_notebook("scripted_chat.ipynb", timeout=90)
        ui.run_all_cells("scripted_chat.ipynb", timeout=60)
        cell = ui.chat_cell()
        ui.toggle_thinking(cell)
        st = ui.ask(cell, "你好", timeout=30)
        reply = st["assistant"][-1]
        with ui.step("检查回答和思考块"):
            assert reply["text"].startswith("你好！我是脚本助手。"), reply
            assert reply["thought"] and "用户在打招呼" in reply["thought_text"], reply
            assert st["seen_streaming"], "回答应是流式出现的（先看到 .llava-chat-streaming）"
        ui.screenshot(cell, "scripted_chat.png")
        ui.clear(cell)


@pytest.mark.timeout(240)
def test_qwen3_chat_notebook(lab, mini_world):
    with _notebook_page(lab, "01_qwen3_chat") as ui:
        ui.open_notebook("notebooks/01_qwen3_chat.ipynb")
        ui.run_all_cells("notebooks/01_qwen3_chat.ipynb", timeout=150)
        cell = ui.chat_cell()
        ui.toggle_thinking(cell)
        st = ui.ask(cell, "请描述一个简单的场景。", timeout=90)
        reply = st["assistant"][-1]
        with ui.step("检查思考块（灰色、折叠的 details.llava-chat-thought）"):
            assert reply["thought"], f"思考模式下回答上方应有思考块：{reply}"
            assert reply["thought_text"], f"思考块不应为空：{reply}"
        ui.screenshot(cell, "01_qwen3_chat.png")
        ui.clear(cell)


@pytest.fixture(scope="module")
def stage1_projection(lab, mini_world):
    """A short Stage 1 run saved where 05_llava_chat reads it (``notebook_stage1_dir(paths) / "final"``)."""
    from llava_lib import config, explain
    from llava_lib.train import TrainConfig, train

    _, _, work = lab
    paths = config.resolve("mini", checkpoints_dir=work / "checkpoints")
    out = explain.notebook_stage1_dir(paths)
    quick = dict(batch_size=8, eval_limit=8, caption_show_n=0) if STAGE1_STEPS < 100 else dict(eval_limit=64)
    cfg = TrainConfig.for_profile("mini", out_dir=str(out), max_steps=STAGE1_STEPS, caption_eval_n=0,
                                  eval_every=10_000, save_every=10_000, tensorboard=False, progress=False, **quick)
    train(cfg)
    final = out / "final"
    assert (final / "projection.safetensors").exists(), f"训练后没有找到 {final / 'projection.safetensors'}"
    return final


@pytest.mark.timeout(240 + 6 * STAGE1_STEPS)  # includes the short training in the fixture
def test_llava_chat_notebook(lab, stage1_projection):
    with _notebook_page(lab, "05_llava_chat") as ui:
        ui.open_notebook("notebooks/05_llava_chat.ipynb")
        ui.run_all_cells("notebooks/05_llava_chat.ipynb", timeout=150)
        cell = ui.chat_cell()
        with ui.step("检查控件里显示了示例图片"):
            image = ui.chat_state(cell)["image"]
            assert image and image["visible"] and image["width"] > 0, f"应显示第一张示例图片：{image}"
        st = ui.ask(cell, "请描述这张图片。", timeout=90)
        assert st["assistant"][-1]["text"]
        shot = ui.screenshot(cell, "05_llava_chat.png")
        small = small_png(shot, ARTIFACTS / "05_llava_chat.small.png")
        if os.environ.get("LLAVA_UPDATE_SCREENSHOTS") == "1":
            README_SHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(small, README_SHOT)
        ui.clear(cell)
