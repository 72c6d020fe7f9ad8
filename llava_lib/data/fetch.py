"""Fetch one image from ``http(s)://``, ``file://`` or a plain path, robustly.

Every failure is a :class:`FetchError`: a short ``reason`` (for the failure manifest), a Chinese message, and
``transient`` (worth retrying in a later run). Content is verified by decoding, never by the Content-Type header.
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

DEFAULT_MAX_BYTES = 32 << 20    # SA-1B photos are ~0.5 MB; anything near this is not a photo
DEFAULT_RETRIES = 3
MAX_RETRY_AFTER = 30            # seconds: a server asking for an hour would stall a download worker for an hour
REFRESH_LINKS_CMD = "python -m llava_lib.download data --force"  # fresh signed SA-1B links
EXPIRED_HINT = (f"HTTP 403 多半表示图片链接已过期（SA-1B 的图片地址是带签名的临时链接）：运行 `{REFRESH_LINKS_CMD}` "
                f"重新下载数据分片得到新链接，再运行同一个 prepare 命令（这些行会重试）。")
REASONS = {  # reason -> what a student reads in the summary
    "timeout": "超时", "connection": "连接失败", "incomplete": "下载不完整（连接中断）",
    "http_403": "链接已过期或无权访问", "http_4xx": "HTTP 客户端错误", "http_5xx": "HTTP 服务器错误",
    "too_large": "文件超过大小上限", "not_image": "内容不是图片", "truncated": "图片数据被截断",
    "decode_error": "图片无法解码", "decompression_bomb": "图片像素过多（疑似解压炸弹）",
    "not_found": "本地文件不存在", "read_error": "本地文件读取失败", "bad_url": "不支持的地址", "bad_row": "数据行无法解析",
}
RETRY_STATUS = (429, 500, 502, 503, 504)  # retried within one download (backoff, or the server's Retry-After)
# Also worth a later run: 403, since an expired SA-1B link works again once the shards are downloaded afresh.
TRANSIENT_STATUS = {403, 408, 425, 429}


class FetchError(Exception):
    """``reason``: short key (``http_404``, ``timeout``, ``not_image`` ...); ``transient``: may succeed later."""

    def __init__(self, reason: str, message: str, url: str = "", transient: bool = False):
        super().__init__(message)
        self.reason, self.message, self.url, self.transient = reason, message, url, transient

    def __reduce__(self):  # picklable across DataLoader workers
        return FetchError, (self.reason, self.message, self.url, self.transient)


def reason_label(reason: str) -> str:
    if reason in REASONS or not reason.startswith("http_"):
        return REASONS.get(reason, reason)
    return f"HTTP {reason[5:]}（{REASONS['http_5xx' if reason[5] == '5' else 'http_4xx']}）"


_local = threading.local()


def _session(retries: int = DEFAULT_RETRIES, backoff: float = 0.5) -> requests.Session:
    """One pooled session per thread, process and retry policy: requests.Session is not thread-safe, and a forked
    DataLoader worker must not share its parent's open connections. Retried: connection errors, timeouts before the
    first byte and :data:`RETRY_STATUS`; the last error response is returned, not raised, so it becomes a
    :class:`FetchError` naming its status."""
    sessions, key = _local.__dict__.setdefault("sessions", {}), (os.getpid(), retries, backoff)
    if key not in sessions:
        s = sessions[key] = requests.Session()
        s.headers["User-Agent"] = "llava-course-data/0.1"
        retry = Retry(total=max(0, int(retries)), status_forcelist=RETRY_STATUS, backoff_factor=backoff, backoff_max=30,
                      backoff_jitter=backoff, retry_after_max=MAX_RETRY_AFTER, raise_on_status=False)
        for prefix in ("http://", "https://"):
            s.mount(prefix, HTTPAdapter(max_retries=retry))
    return sessions[key]


def _read_local(path: Path, url: str, max_bytes: int) -> bytes:
    try:
        if path.stat().st_size > max_bytes:
            raise FetchError("too_large", f"文件 {path} 有 {path.stat().st_size} 字节，超过上限 {max_bytes}", url)
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise FetchError("not_found", f"本地文件不存在或不是文件：{path}", url) from None
    except OSError as e:
        raise FetchError("read_error", f"读取 {path} 失败：{e}", url) from None


def _get(url: str, timeout: float, max_bytes: int, retries: int, backoff: float) -> bytes:
    """One download, streamed and size-capped, with an overall deadline against servers that trickle the body."""
    tried = f"（已重试 {retries} 次）"
    try:
        with _session(retries, backoff).get(url, stream=True, timeout=(timeout, timeout)) as r:
            code = r.status_code
            if code == 403:
                raise FetchError("http_403", f"{url} 拒绝访问。{EXPIRED_HINT}", url, True)
            if code != 200:
                retried = tried if code in RETRY_STATUS and retries else ""
                raise FetchError(f"http_{code}", f"HTTP {code}{retried}：{url}", url,
                                 transient=code >= 500 or code in TRANSIENT_STATUS)
            declared = r.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise FetchError("too_large", f"{url} 声明大小 {declared} 字节，超过上限 {max_bytes}", url)
            deadline, buf = time.monotonic() + 4 * timeout, bytearray()
            for chunk in r.iter_content(chunk_size=64 << 10):
                buf += chunk
                if len(buf) > max_bytes:
                    raise FetchError("too_large", f"{url} 超过大小上限 {max_bytes} 字节", url)
                if time.monotonic() > deadline:
                    raise FetchError("timeout", f"下载 {url} 超过 {4 * timeout:.0f} 秒仍未完成", url, True)
            return bytes(buf)
    except requests.exceptions.Timeout:
        raise FetchError("timeout", f"{url} 在 {timeout:g} 秒内没有响应{tried}", url, True) from None
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as e:
        raise FetchError("incomplete", f"{url} 下载中断：{type(e).__name__}", url, True) from None
    except requests.exceptions.ConnectionError as e:
        cause = e.args[0] if e.args else None
        cause = getattr(cause, "reason", cause)  # under requests' wrapper and urllib3's MaxRetryError
        # requests reports a read timeout (after the retries, or mid-body) as a ConnectionError.
        if isinstance(cause, urllib3.exceptions.ReadTimeoutError):
            raise FetchError("timeout", f"{url} 在 {timeout:g} 秒内没有数据{tried}", url, True) from None
        raise FetchError("connection", f"无法连接 {url}{tried}：{type(cause).__name__}", url, True) from None
    except requests.exceptions.RequestException as e:
        raise FetchError("bad_url", f"无法请求 {url}：{e}", url) from None
    except urllib3.exceptions.HTTPError as e:  # e.g. a malformed Retry-After header, not wrapped by requests
        raise FetchError("connection", f"{url} 的响应无法处理：{type(e).__name__}: {e}", url, True) from None


def fetch_bytes(url: str, *, timeout: float = 20.0, max_bytes: int = DEFAULT_MAX_BYTES, retries: int = DEFAULT_RETRIES,
                backoff: float = 0.5, url_rewrite: tuple[str, str] | None = None) -> bytes:
    """Raw bytes of ``url``. ``url_rewrite = (prefix, replacement)`` maps e.g. the mini world's image server to a
    local folder."""
    if url_rewrite and url.startswith(url_rewrite[0]):
        url = url_rewrite[1] + url[len(url_rewrite[0]):]
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _get(url, timeout, max_bytes, retries, backoff)
    if scheme == "file":
        return _read_local(Path(url2pathname(unquote(urlparse(url).path))), url, max_bytes)
    if len(scheme) <= 1:  # a plain path (a one-letter scheme is a Windows drive)
        return _read_local(Path(url).expanduser(), url, max_bytes)
    raise FetchError("bad_url", f"不支持的地址类型 {scheme}://（支持 http、https、file 和本地路径）：{url}", url)


def decode_image(data: bytes, url: str = "") -> Image.Image:
    """Decode fully (so truncation shows now, not in a training step), apply EXIF orientation, RGB out."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        # Checked here: Pillow only warns below twice the limit, and warning filters are not thread-safe.
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise FetchError("decompression_bomb", f"{url} 声明 {w}x{h} 像素，超过上限 {Image.MAX_IMAGE_PIXELS}", url)
        img.load()
    except Image.DecompressionBombError as e:
        raise FetchError("decompression_bomb", f"{url}：{e}", url) from None
    except UnidentifiedImageError:
        raise FetchError("not_image", f"{url} 的内容不是可识别的图片（{len(data)} 字节）", url) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "decode_error"
        raise FetchError(reason, f"{url} 的图片无法解码：{e}", url) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block only loses the rotation
        pass
    return img.convert("RGB")


def fetch_image(url: str, **fetch_opts) -> Image.Image:
    """An RGB PIL image from ``url`` (options as :func:`fetch_bytes`), or :class:`FetchError`."""
    return decode_image(fetch_bytes(url, **fetch_opts), url)
