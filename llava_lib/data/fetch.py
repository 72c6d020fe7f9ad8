"""Fetch one image from ``http(s)://``, ``file://`` or a plain path, robustly.

Every failure becomes a :class:`FetchError` with a short machine-readable ``reason`` (it goes into the failure
manifest), a Chinese message, and ``transient`` (worth retrying later). Content is verified by decoding, never
by the Content-Type header, and Pillow's decompression-bomb guard stays on.
"""
from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

DEFAULT_TIMEOUT = 20.0          # seconds without a byte before giving up on an attempt
DEFAULT_MAX_BYTES = 32 << 20    # SA-1B photos are ~0.5 MB; anything near this is not a photo
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5           # seconds: urllib3 waits 0, then 2x, 4x ... this between attempts, plus jitter
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 30            # seconds: a server that asks for an hour would stall a download worker for an hour
USER_AGENT = "llava-course-data/0.1"
# How a student gets fresh image links once SA-1B's signed URLs have expired.
REFRESH_LINKS_CMD = "python -m llava_lib.download data --force"

REASONS = {  # reason -> what a student reads in the summary
    "timeout": "超时",
    "connection": "连接失败",
    "incomplete": "下载不完整（连接中断）",
    "http_403": "链接已过期或无权访问",
    "http_4xx": "HTTP 客户端错误",
    "http_5xx": "HTTP 服务器错误",
    "too_large": "文件超过大小上限",
    "not_image": "内容不是图片",
    "truncated": "图片数据被截断",
    "decode_error": "图片无法解码",
    "decompression_bomb": "图片像素过多（疑似解压炸弹）",
    "not_found": "本地文件不存在",
    "read_error": "本地文件读取失败",
    "bad_url": "不支持的地址",
    "bad_row": "数据行无法解析",
}
RETRY_STATUS = (429, 500, 502, 503, 504)  # retried within the same download (backoff, or the server's Retry-After)
# Worth another try in a later run (the failure manifest marks them transient): every 5xx, these, and 403, since an
# expired SA-1B link works again once the dataset shards are downloaded afresh.
TRANSIENT_STATUS = {403, 408, 425, 429}


class FetchError(Exception):
    """``reason``: short key (``http_404``, ``timeout``, ``not_image`` ...); ``transient``: may succeed later."""

    def __init__(self, reason: str, message: str, url: str = "", transient: bool = False):
        super().__init__(message)
        self.reason, self.message, self.url, self.transient = reason, message, url, transient

    def __reduce__(self):  # picklable across DataLoader workers
        return FetchError, (self.reason, self.message, self.url, self.transient)


def reason_label(reason: str) -> str:
    if reason in REASONS:
        return REASONS[reason]
    if reason.startswith("http_"):
        code = reason[5:]
        return f"HTTP {code}（{REASONS['http_5xx' if code.startswith('5') else 'http_4xx']}）"
    return reason


def rewrite_url(url: str, url_rewrite: tuple[str, str] | None) -> str:
    """``(prefix, replacement)``: e.g. the mini world's ``http://127.0.0.1:18765/`` -> ``file:///.../images/``."""
    if url_rewrite and url.startswith(url_rewrite[0]):
        return url_rewrite[1] + url[len(url_rewrite[0]):]
    return url


def retry_policy(retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF) -> Retry:
    """What urllib3 retries inside one download: connection errors, timeouts before the first byte, and
    :data:`RETRY_STATUS` (honouring Retry-After, capped at :data:`MAX_RETRY_AFTER`). The last error response is
    returned rather than raised, so it becomes a :class:`FetchError` that names its status."""
    return Retry(total=max(0, int(retries)), status_forcelist=RETRY_STATUS, backoff_factor=backoff,
                 backoff_max=MAX_BACKOFF, backoff_jitter=backoff, respect_retry_after_header=True,
                 retry_after_max=MAX_RETRY_AFTER, allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False)


_local = threading.local()


def _session(retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF) -> requests.Session:
    """One pooled session per thread, process and retry policy: requests.Session is not thread-safe, and a
    DataLoader worker forked from a process that fetched before must not share its parent's open connections."""
    pid, sessions = getattr(_local, "sessions", (None, None))
    if pid != os.getpid():
        sessions = {}
        _local.sessions = (os.getpid(), sessions)
    key = (int(retries), float(backoff))
    s = sessions.get(key)
    if s is None:
        s = requests.Session()
        s.headers["User-Agent"] = USER_AGENT
        adapter = HTTPAdapter(max_retries=retry_policy(retries, backoff))
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        sessions[key] = s
    return s


def _status_error(code: int, url: str, retries: int) -> FetchError:
    if code == 403:
        return FetchError("http_403", f"HTTP 403：{url} 拒绝访问，多半是链接已过期（SA-1B 的图片地址是带签名的临时链接，"
                                      f"过一段时间就失效）。重新下载数据分片（{REFRESH_LINKS_CMD}）可以得到新的链接，"
                                      f"然后再运行同一个 prepare 命令。", url, transient=True)
    tried = f"（已重试 {retries} 次）" if code in RETRY_STATUS and retries else ""
    return FetchError(f"http_{code}", f"HTTP {code}{tried}：{url}", url,
                      transient=code >= 500 or code in TRANSIENT_STATUS)


def _urllib3_cause(e: BaseException):
    """The urllib3 error under requests' wrapper (and under urllib3's MaxRetryError)."""
    cause = e.args[0] if e.args else None
    return getattr(cause, "reason", cause)


def _read_local(path: Path, url: str, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError("too_large", f"文件 {path} 有 {size} 字节，超过上限 {max_bytes}", url)
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise FetchError("not_found", f"本地文件不存在：{path}", url) from None
    except IsADirectoryError:
        raise FetchError("not_found", f"{path} 是目录，不是图片文件", url) from None
    except OSError as e:
        raise FetchError("read_error", f"读取 {path} 失败：{e}", url) from None


def _get(url: str, timeout: float, max_bytes: int, retries: int, backoff: float) -> bytes:
    """One download, urllib3 retrying as :func:`retry_policy` says; streamed, size-capped, with an overall
    deadline against servers that trickle the body."""
    try:
        with _session(retries, backoff).get(url, stream=True, timeout=(timeout, timeout)) as r:
            if r.status_code != 200:
                raise _status_error(r.status_code, url, retries)
            deadline = time.monotonic() + 4 * timeout  # for the body, once urllib3's retries are behind us
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError("too_large", f"{url} 声明大小 {declared} 字节，超过上限 {max_bytes}", url)
            buf = bytearray()
            for chunk in r.iter_content(chunk_size=64 << 10):
                buf += chunk
                if len(buf) > max_bytes:
                    raise FetchError("too_large", f"{url} 超过大小上限 {max_bytes} 字节", url)
                if time.monotonic() > deadline:
                    raise FetchError("timeout", f"下载 {url} 超过 {4 * timeout:.0f} 秒仍未完成", url, transient=True)
            return bytes(buf)
    except FetchError:
        raise
    except requests.exceptions.Timeout:
        raise FetchError("timeout", f"{url} 在 {timeout:g} 秒内没有响应（已重试 {retries} 次）", url,
                         transient=True) from None
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as e:
        raise FetchError("incomplete", f"{url} 下载中断：{type(e).__name__}", url, transient=True) from None
    except requests.exceptions.ConnectionError as e:
        # requests reports a read timeout (after urllib3's retries, or in the middle of the body) as ConnectionError.
        if isinstance(_urllib3_cause(e), urllib3.exceptions.ReadTimeoutError):
            raise FetchError("timeout", f"{url} 在 {timeout:g} 秒内没有数据（已重试 {retries} 次）", url,
                             transient=True) from None
        raise FetchError("connection", f"无法连接 {url}（已重试 {retries} 次）：{type(_urllib3_cause(e)).__name__}",
                         url, transient=True) from None
    except requests.exceptions.RequestException as e:
        raise FetchError("bad_url", f"无法请求 {url}：{e}", url) from None
    except urllib3.exceptions.HTTPError as e:  # e.g. a malformed Retry-After header, not wrapped by requests
        raise FetchError("connection", f"{url} 的响应无法处理：{type(e).__name__}: {e}", url, transient=True) from None


def fetch_bytes(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                url_rewrite: tuple[str, str] | None = None) -> bytes:
    """Raw bytes of ``url``; HTTP(S) errors worth retrying are retried ``retries`` times, others fail at once."""
    url = rewrite_url(url, url_rewrite)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _get(url, timeout, max_bytes, retries, backoff)
    if scheme == "file":
        parsed = urlparse(url)
        return _read_local(Path(url2pathname(unquote(parsed.path))), url, max_bytes)
    if scheme == "" or len(scheme) == 1:  # a plain path (a one-letter scheme is a Windows drive)
        return _read_local(Path(url).expanduser(), url, max_bytes)
    raise FetchError("bad_url", f"不支持的地址类型 {scheme}://（支持 http、https、file 和本地路径）：{url}", url)


def decode_image(data: bytes, url: str = "", max_pixels: int | None = None) -> Image.Image:
    """Decode fully (so truncation shows now, not in a training step), apply EXIF orientation, RGB out."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        # Checked here, not via warnings filters: those are process-global and not thread-safe.
        if limit and w * h > limit:
            raise FetchError("decompression_bomb", f"{url} 声明 {w}x{h} 像素，超过上限 {limit}", url)
        img.load()
    except FetchError:
        raise
    except Image.DecompressionBombError as e:
        raise FetchError("decompression_bomb", f"{url}：{e}", url) from None
    except UnidentifiedImageError:
        raise FetchError("not_image", f"{url} 的内容不是可识别的图片（{len(data)} 字节）", url) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "decode_error"
        raise FetchError(reason, f"{url} 的图片无法解码：{e}", url) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block only loses the rotation, the pixels are fine
        pass
    return img.convert("RGB")


def fetch_image(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                url_rewrite: tuple[str, str] | None = None, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from ``url``, or :class:`FetchError`."""
    data = fetch_bytes(url, timeout=timeout, max_bytes=max_bytes, retries=retries, backoff=backoff,
                       url_rewrite=url_rewrite)
    return decode_image(data, url, max_pixels)
