"""Files a crash cannot tear: checkpoints, the image cache's shards and manifests, the mini world's records. Kept
apart from the model and data packages so that both import it without loading the other (or transformers)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TEMP_GLOB = ".*.tmp"  # the temp files below, as a killed writer leaves them behind


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8"))
