"""Serve the mini world's images on loopback, so its parquet URLs work as real HTTP URLs."""
import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep notebooks and test logs clean
        pass


@contextlib.contextmanager
def serving(root: Path, port: int = 0):
    """Serve ``root/images`` on 127.0.0.1 (port 0 = any free port); yields the base URL ending in '/'."""
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Quiet, directory=str(Path(root) / "images")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
