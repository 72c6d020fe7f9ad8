"""The mini world: a small, seeded, offline world in which the whole pipeline really learns on a CPU.

Build it with ``python -m llava_lib.mini build``; check it with ``python -m llava_lib.mini check``.
The builder (and its torch/transformers training code) loads on first use, so importing a small piece such as
``llava_lib.mini.scenes`` stays cheap.
"""
from __future__ import annotations

import importlib

# ``build`` and ``check`` are not re-exported: the submodule of the same name would shadow them once imported.
# Call ``llava_lib.mini.build.build`` / ``.check`` (or ``python -m llava_lib.mini build|check``).
__all__ = ["MINI_URL_BASE", "BuildSpec", "url_rewrite"]


def __getattr__(name: str):
    if name in __all__:
        module = importlib.import_module(".build", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
