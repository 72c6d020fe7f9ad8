"""Drive a real JupyterLab in headless Chromium (Playwright) — the helpers behind ``tests/test_browser.py``.

* :class:`JupyterLab` starts ``jupyter lab`` on 127.0.0.1 (free port, random token, isolated config / settings /
  workspace / runtime dirs) and stops it — kernels included — in all cases.
* :func:`launch_chromium` starts Debian's ``/usr/bin/chromium`` (never a downloaded browser).
* :class:`LabPage` does what a student does: open a notebook, Run > Run All Cells, type into a chat widget,
  press buttons. Every wait is bounded; every step runs inside :meth:`LabPage.step`, which turns any failure into
  an ``AssertionError`` that names the step, shows the visible text of the page / cell and the path of a
  screenshot taken at that moment.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("LLAVA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# JupyterLab user settings for the test: no news / update pop-ups over the notebook, every cell kept in the DOM
# (no windowing), no autosave.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


class BrowserTestError(AssertionError):
    """A browser step failed; the message says which one and what was on screen."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check, timeout: float, what: str, interval: float = 0.25):
    """Call ``check()`` until it returns something truthy (returned) or ``timeout`` seconds pass (TimeoutError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}：{timeout:.0f} 秒内没有发生")
        time.sleep(interval)


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-n:]


def _head(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "…"


# ----------------------------------------------------------------------------------------------- server
class JupyterLab:
    """``jupyter lab`` on 127.0.0.1 with a token; use as a context manager (stopped in all cases)."""

    def __init__(self, root_dir: Path, work_dir: Path, env: dict | None = None, startup_timeout: float = 90.0):
        self.root_dir = Path(root_dir)
        self.work_dir = Path(work_dir)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.token = secrets.token_hex(16)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.work_dir / "jupyter-lab.log"
        self.runtime_dir = self.work_dir / "runtime"

    # -- lifecycle
    def __enter__(self) -> "JupyterLab":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _prepare_dirs(self) -> dict:
        settings = self.work_dir / "lab-settings"
        for name, values in LAB_SETTINGS.items():
            plugin, _, file = name.rpartition("/")
            target = settings / plugin / file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values), encoding="utf-8")
        for sub in ("config", "workspaces", "runtime"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(self.work_dir / "config"),
            JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(self.work_dir / "workspaces"),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
        )
        env.pop("JUPYTER_TOKEN", None)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        env = self._prepare_dirs()
        last_error = None
        for _attempt in range(3):  # a free port can be taken between free_port() and the bind
            self.port = free_port()
            cmd = [sys.executable, "-m", "jupyterlab", "--no-browser",
                   "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
                   "--ServerApp.terminals_enabled=False",
                   "--ServerApp.jpserver_extensions={'jupyter_lsp': False}",
                   "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.news_url=None"]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                cmd.append("--allow-root")
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(cmd, cwd=self.root_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
            try:
                poll(self._ready, self.startup_timeout, f"jupyter lab 在端口 {self.port} 上启动")
                return
            except (TimeoutError, RuntimeError) as e:
                last_error = e
                self._terminate()
                if "address already in use" not in self.log().lower():
                    break
        raise RuntimeError(f"jupyter lab 没有启动：{last_error}\n--- 服务器日志（末尾）---\n{_tail(self.log(), 3000)}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"jupyter lab 已退出（返回码 {self.proc.returncode}）")
        try:
            self.api("GET", "api/status", timeout=2)
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Shut the kernels down, then the server (SIGTERM, then SIGKILL); kill leftover kernels of this server."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for k in self.kernels():
                    with contextlib.suppress(Exception):
                        self.api("DELETE", f"api/kernels/{k['id']}", timeout=10)
        self._terminate()
        self._kill_leftover_kernels()

    def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _kill_leftover_kernels(self) -> None:
        """Kernels of this server have its private runtime dir in their command line (``-f <runtime>/kernel-*``)."""
        marker = str(self.runtime_dir).encode()
        proc_dir = Path("/proc")
        if not proc_dir.is_dir():
            return
        for entry in proc_dir.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and b"kernel" in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)

    # -- helpers
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}?token={self.token}"

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.base_url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def kernels(self) -> list[dict]:
        return self.api("GET", "api/kernels") or []

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


# ----------------------------------------------------------------------------------------------- browser
def launch_chromium(playwright):
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"没有找到 {CHROMIUM}：浏览器测试用 Debian 的 chromium（apt-get install -y chromium）")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)


_VISIBLE_TEXT_JS = """(el) => (el.innerText || '').replace(/\\n{3,}/g, '\\n\\n')"""

_CELL_STATE_JS = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-CodeCell')];
  const tb = /Traceback \\(most recent call last\\)|(^|\\n)\\s*[A-Za-z_.]*(Error|Exception|Interrupt)\\b[^\\n]*\\s*$/;
  return {
    prompts: cells.map(c => ((c.querySelector('.jp-InputArea-prompt') || {}).innerText || '').trim()),
    errors: [...document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(e => (e.innerText || '').trim()).filter(t => tb.test(t)),
  };
}"""


class LabPage:
    """One Chromium page on the JupyterLab server; each action is a named, bounded step."""

    def __init__(self, page, server: JupyterLab, artifacts: Path, name: str):
        self.page = page
        self.server = server
        self.artifacts = Path(artifacts)
        self.name = name
        self.focus = None  # locator whose text goes into failure messages (the chat cell once found)
        self.console: list[str] = []
        self.timings: list[tuple[str, float]] = []  # (step, seconds)
        page.on("console", lambda m: m.type in ("error", "warning") and self.console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"[pageerror] {e}"))

    # -- failure reporting
    @contextlib.contextmanager
    def step(self, what: str):
        t0 = time.monotonic()
        try:
            yield
        except BrowserTestError:
            raise
        except Exception as e:
            raise BrowserTestError(self.report(what, e)) from None
        finally:
            self.timings.append((what, time.monotonic() - t0))

    def report(self, what: str, error: BaseException) -> str:
        shot = self.artifacts / f"FAILED-{self.name}.png"
        try:
            self.page.screenshot(path=str(shot), full_page=False, timeout=15_000)
            shot_line = f"失败时的截图：{shot}"
        except Exception as e:  # the page may be gone
            shot_line = f"（没能截图：{type(e).__name__}: {_head(str(e), 200)}）"
        parts = [f"浏览器测试 [{self.name}] 在这一步失败：{what}", f"原因：{type(error).__name__}: {_head(str(error), 1500)}",
                 shot_line]
        if self.focus is not None:
            parts.append("--- 聊天单元格里看得到的文字 ---\n" + _head(self.visible_text(self.focus), 3000))
        with contextlib.suppress(Exception):
            state = self.page.evaluate(_CELL_STATE_JS)
            parts.append(f"--- 代码单元格的执行编号 --- {state['prompts']}")
            if state["errors"]:
                parts.append("--- 笔记本里的错误输出 ---\n" + _head("\n\n".join(state["errors"]), 3000))
        with contextlib.suppress(Exception):
            notebook = self.page.locator(".jp-NotebookPanel")
            where, locator = ("笔记本", notebook) if notebook.count() else ("页面", self.page.locator("body"))
            parts.append(f"--- {where}上看得到的文字（末尾）---\n" + _tail(self.visible_text(locator), 2500))
        if self.console:
            parts.append("--- 浏览器控制台（错误/警告，末尾）---\n" + _tail("\n".join(self.console), 1500))
        parts.append("--- jupyter lab 日志（末尾）---\n" + _tail(self.server.log(), 1500))
        return "\n".join(parts)

    def visible_text(self, locator) -> str:
        try:
            return locator.first.evaluate(_VISIBLE_TEXT_JS, timeout=5_000)
        except Exception as e:
            return f"（读不到：{type(e).__name__}: {_head(str(e), 200)}）"

    # -- notebook
    def open_notebook(self, path: str, timeout: float = 120) -> None:
        with self.step(f"打开 {path}"):
            if not (self.server.root_dir / path).is_file():
                raise FileNotFoundError(f"服务器目录里没有这个笔记本：{self.server.root_dir / path}")
            # a workspace of its own, reset: only this notebook is open (no tabs restored from an earlier page)
            workspace = re.sub(r"[^A-Za-z0-9_-]", "-", self.name)
            url = self.server.url(f"lab/workspaces/{workspace}/tree/{path}").replace("?", "?reset&", 1)
            self.page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
            self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(
                state="visible", timeout=timeout * 1000)
            self._collapse_left_sidebar()
        with self.step(f"等待 {path} 的内核启动"):
            poll(lambda: self._kernel_state(path) == "idle", timeout, "内核启动并空闲")

    def _collapse_left_sidebar(self) -> None:
        """Close the file browser (as on a narrow screen) so the notebook gets the full width; cosmetic only."""
        with contextlib.suppress(Exception):
            tab = self.page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
            if tab.count():
                tab.first.click(timeout=5_000)
                self.page.locator("#jp-left-stack").wait_for(state="hidden", timeout=5_000)

    def _session(self, path: str) -> dict | None:
        for s in self.server.api("GET", "api/sessions") or []:
            if s.get("path") == path and s.get("kernel"):
                return s
        return None

    def _kernel_state(self, path: str) -> str:
        s = self._session(path)
        return (s or {}).get("kernel", {}).get("execution_state", "")

    def run_all_cells(self, path: str, timeout: float) -> None:
        """Run > Run All Cells from the menu bar, then wait until every code cell has run and the kernel is idle."""
        with self.step("菜单 Run > Run All Cells"):
            self.page.locator(".jp-NotebookPanel .jp-Notebook").first.click(position={"x": 5, "y": 5})
            self.page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).first.click(timeout=15_000)
            item = self.page.locator(".lm-Menu-item", has=self.page.locator(".lm-Menu-itemLabel",
                                                                            has_text=re.compile(r"^Run All Cells$")))
            item.first.click(timeout=15_000)
        with self.step(f"运行全部单元格（最多 {timeout:.0f} 秒）"):
            t0 = time.monotonic()
            quiet_since = None  # kernel idle and no cell waiting ([*]) since then
            while True:
                state = self.page.evaluate(_CELL_STATE_JS)
                prompts = state["prompts"]
                ran = [bool(re.search(r"\[\d+\]", p)) for p in prompts]
                quiet = self._kernel_state(path) == "idle" and not any("*" in p for p in prompts)
                quiet_since = (quiet_since or time.monotonic()) if quiet else None
                waited = time.monotonic() - t0
                if quiet_since is not None:
                    if ran and all(ran) and time.monotonic() - quiet_since >= 1.0:
                        break
                    if any(ran) and time.monotonic() - quiet_since >= 3.0:  # an error stopped Run All
                        break
                    if not any(ran) and waited > 20:
                        raise RuntimeError(f"Run All Cells 没有开始运行（20 秒后所有单元格都没有执行编号）：{prompts}")
                if waited > timeout:
                    raise TimeoutError(f"{timeout:.0f} 秒后还没运行完；执行编号：{prompts}，内核："
                                       f"{self._kernel_state(path) or '无'}")
                time.sleep(0.5)
            if state["errors"] or not all(ran):
                not_run = [i + 1 for i, r in enumerate(ran) if not r]
                raise RuntimeError(f"有单元格出错（没有运行的代码单元格：第 {not_run} 个）：\n"
                                   + _head("\n\n".join(state["errors"]) or "（没有找到错误输出）", 3000))

    # -- widgets
    def chat_cell(self, timeout: float = 60):
        with self.step("找到聊天控件（.llava-chat）"):
            cell = self.page.locator(".jp-Notebook .jp-CodeCell").filter(has=self.page.locator(".llava-chat")).last
            cell.wait_for(state="visible", timeout=timeout * 1000)
            cell.scroll_into_view_if_needed(timeout=10_000)
            self.focus = cell
            return cell

    def screenshot(self, locator, name: str) -> Path:
        path = self.artifacts / name
        with self.step(f"截图 {name}"):
            locator.scroll_into_view_if_needed(timeout=10_000)
            locator.screenshot(path=str(path), timeout=30_000, animations="disabled")
        return path

    # -- the chat widget (llava_lib.widgets)
    def chat_state(self, cell) -> dict:
        return cell.evaluate(_CHAT_STATE_JS, timeout=10_000)

    def toggle_thinking(self, cell, timeout: float = 30) -> None:
        with self.step("打开思考模式（点击 .llava-chat-thinking）"):
            toggle = cell.locator(".llava-chat-thinking")
            toggle.click(timeout=10_000)
            # mod-active: the browser toggled it; mod-success: the kernel saw the change and styled the button
            poll(lambda: {"mod-active", "mod-success"} <= set((toggle.get_attribute("class") or "").split()),
                 timeout, "思考模式按钮变为按下（mod-active）并由内核改成绿色（mod-success）")

    def ask(self, cell, question: str, timeout: float) -> dict:
        """Type ``question``, press 发送, wait until the new assistant bubble is finished; returns its state."""
        with self.step("在 .llava-chat-input 里输入问题"):
            before = len(self.chat_state(cell)["assistant"])
            box = cell.locator(".llava-chat-input textarea")
            box.click(timeout=10_000)
            box.fill(question, timeout=10_000)
        with self.step("点击 发送（.llava-chat-send）"):
            cell.locator(".llava-chat-send").click(timeout=10_000)
        with self.step(f"等待助手的回答出现并完成（最多 {timeout:.0f} 秒）"):
            seen_streaming = False

            def reply():
                nonlocal seen_streaming
                st = self.chat_state(cell)
                if st["error"]:
                    raise RuntimeError(f"控件的错误行：{st['error']}")
                if len(st["assistant"]) <= before:
                    return None
                last = st["assistant"][-1]
                seen_streaming = seen_streaming or last["streaming"]
                return st if last["done"] and last["text"] else None

            st = poll(reply, timeout, "助手气泡（.llava-chat-assistant）里出现完成的回答（.llava-chat-done）")
            st["seen_streaming"] = seen_streaming
        with self.step("检查问题气泡和输入框"):
            assert st["user"] and st["user"][-1] == question, f"最后一个用户气泡应是问题 {question!r}：{st['user']}"
            poll(lambda: self.chat_state(cell)["input"] == "", 10, "发送后输入框被清空")
        return st

    def clear(self, cell, timeout: float = 30) -> dict:
        with self.step("点击 清空（.llava-chat-clear）"):
            cell.locator(".llava-chat-clear").click(timeout=10_000)
        with self.step("等待对话记录变空（.llava-chat-history 里没有消息）"):
            return poll(lambda: (lambda st: st if not st["messages"] and "清空" in st["status"] else None)(
                self.chat_state(cell)), timeout, "清空后对话记录为空、状态行显示“已清空”")


_CHAT_STATE_JS = """(cell) => {
  const text = (el) => el ? (el.innerText || '').trim() : '';
  const chat = cell.querySelector('.llava-chat');
  const visible = (el) => !!el && el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
  const history = chat.querySelector('.llava-chat-history');
  const assistant = [...history.querySelectorAll('.llava-chat-message.llava-chat-assistant')].map(row => {
    const details = row.querySelector('details.llava-chat-thought');
    const done = row.querySelector('.llava-chat-done');
    const streaming = row.querySelector('.llava-chat-streaming');
    return {
      text: text(done || streaming),
      done: !!done, streaming: !!streaming,
      thought: visible(details),
      thought_summary: details ? text(details.querySelector('summary')) : '',
      thought_text: details ? ((details.querySelector('div') || {}).textContent || '').trim() : '',
    };
  });
  const img = chat.querySelector('img.llava-chat-image');
  return {
    messages: history.querySelectorAll('.llava-chat-message').length,
    user: [...history.querySelectorAll('.llava-chat-message.llava-chat-user')].map(text),
    assistant,
    input: (chat.querySelector('.llava-chat-input textarea') || {}).value ?? null,
    status: text(chat.querySelector('.llava-chat-status')),
    error: text(chat.querySelector('.llava-chat-error')),
    image: img ? {visible: visible(img), width: img.naturalWidth, height: img.naturalHeight} : null,
  };
}"""


def small_png(src: Path, dst: Path, max_width: int = 900, max_bytes: int = 150_000) -> Path:
    """A downsized, palette PNG copy of a screenshot (for the README), smaller than ``max_bytes``."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        width = min(max_width, im.width)
        while True:
            small = im.resize((width, max(1, round(im.height * width / im.width))), Image.LANCZOS)
            small = small.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            dst.parent.mkdir(parents=True, exist_ok=True)
            small.save(dst, format="PNG", optimize=True)
            if dst.stat().st_size < max_bytes or width <= 300:
                return dst
            width = int(width * 0.85)
