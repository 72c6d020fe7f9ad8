"""Test and benchmark support: a loopback image server that can misbehave on purpose, and SA1B-format sources.

:class:`ImageServer` serves bytes on ``127.0.0.1`` (a free port) and injects the faults a real image host
shows: error statuses, flaky 5xx, stalls, truncated or non-image bodies, oversized bodies, decompression bombs.
It only ever listens on the loopback address, and every stall ends when the server closes.
"""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from llava_lib.mini.scenes import make_scenes, render


def scene_jpegs(n: int, seed: int = 0, size: int | None = None, quality: int = 90) -> list[bytes]:
    """``n`` mini-world scenes as JPEG bytes (``size`` upscales, e.g. to mimic full-size photos)."""
    out = []
    for scene in make_scenes(n, seed):
        img = render(scene)
        if size:
            img = img.resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def scene_captions(n: int, seed: int = 0) -> list[str]:
    return [s.caption for s in make_scenes(n, seed)]


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (the pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@dataclass
class Fault:
    """How the server answers one path. ``kind``: status | flaky | stall | stall_body | body | oversize."""

    kind: str
    status: int = 500
    times: int = 0                   # flaky: fail this many times, then serve the file
    body: bytes = b""
    content_type: str = "image/jpeg"
    size: int = 0                    # oversize: bytes to send
    send_length: bool = True         # oversize: declare Content-Length (or stream until close)
    seconds: float = 30.0            # stall: how long at most (ends earlier when the server closes)
    retry_after: int | None = None   # status / flaky: send a Retry-After header (seconds)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # quiet tests
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", retry_after=None) -> None:
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        with owner.lock:
            owner.hits[path] += 1
            hit = owner.hits[path]
        if owner.delay:
            time.sleep(owner.delay)
        fault = owner.faults.get(path)
        if fault is None or (fault.kind == "flaky" and hit > fault.times):
            body = owner.files.get(path)
            if body is None:
                return self._send(404, b"not found", "text/plain")
            return self._send(200, body)
        if fault.kind in ("status", "flaky"):
            return self._send(fault.status, f"error {fault.status}".encode(), "text/plain", fault.retry_after)
        if fault.kind == "stall":
            owner.closing.wait(fault.seconds)
            self.close_connection = True
            return None
        if fault.kind == "stall_body":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff")
            self.wfile.flush()
            owner.closing.wait(fault.seconds)
            self.close_connection = True
            return None
        if fault.kind == "body":
            return self._send(200, fault.body, fault.content_type)
        if fault.kind == "oversize":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if fault.send_length:
                self.send_header("Content-Length", str(fault.size))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            block = b"\x00" * 65536
            for start in range(0, fault.size, len(block)):
                self.wfile.write(block[:fault.size - start])
            return None
        raise ValueError(f"unknown fault kind {fault.kind}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "ImageServer"

    def handle_error(self, request, client_address):  # a client that gave up is expected here, not an error
        pass


class ImageServer:
    """``with ImageServer(files) as srv: srv.url("/a.jpg")``; ``srv.hits`` counts requests per path."""

    def __init__(self, files: dict[str, bytes] | None = None, faults: dict[str, Fault] | None = None,
                 delay: float = 0.0):
        self.files = dict(files or {})
        self.faults = dict(faults or {})
        self.delay = delay
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def standard_faults(good_jpeg: bytes, max_bytes: int) -> dict[str, Fault]:
    """One of each fault the data pipeline must survive, keyed by path; reason expected in the manifest."""
    return {
        "/fault/404.jpg": Fault("status", status=404),
        "/fault/403.jpg": Fault("status", status=403),             # an expired signed link
        "/fault/flaky.jpg": Fault("flaky", status=500, times=2),   # 500 twice, then the image: must arrive
        "/fault/503.jpg": Fault("status", status=503),             # always 5xx: retried, then transient failure
        "/fault/stall.jpg": Fault("stall"),
        "/fault/stall_body.jpg": Fault("stall_body"),
        "/fault/truncated.jpg": Fault("body", body=good_jpeg[: len(good_jpeg) // 2]),
        "/fault/html.jpg": Fault("body", body=b"<html><body>Not an image</body></html>"),
        "/fault/oversize.jpg": Fault("oversize", size=max_bytes * 2),
        "/fault/oversize_nolen.jpg": Fault("oversize", size=max_bytes * 2, send_length=False),
        "/fault/bomb.png": Fault("body", body=bomb_png(), content_type="image/png"),
    }


EXPECTED_REASONS = {
    "/fault/403.jpg": "http_403",
    "/fault/404.jpg": "http_404",
    "/fault/503.jpg": "http_503",
    "/fault/stall.jpg": "timeout",
    "/fault/stall_body.jpg": "timeout",
    "/fault/truncated.jpg": "truncated",
    "/fault/html.jpg": "not_image",
    "/fault/oversize.jpg": "too_large",
    "/fault/oversize_nolen.jpg": "too_large",
    "/fault/bomb.png": "decompression_bomb",
}


def write_sa1b(path, urls: list[str], captions: list[str], form: str = "json", row_group_size: int | None = None):
    """An SA1B-Dense-Caption-format parquet file (``url``, ``cap_seg``); ``form``: struct | json | literal."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    caps = [{"global_caption": c, "local_caption": [c[:4]]} for c in captions]
    if form == "struct":
        cap_col = pa.array(caps)
    elif form == "json":
        cap_col = pa.array([json.dumps(c, ensure_ascii=False) for c in caps])
    elif form == "literal":
        cap_col = pa.array([repr(c) for c in caps])
    else:
        raise ValueError(form)
    table = pa.table({"url": pa.array(urls, pa.string()), "cap_seg": cap_col})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
