"""The mini world: a small, seeded, offline world in which the whole pipeline really learns on a CPU.

Build it with ``python -m llava_lib.mini build``; check it with ``python -m llava_lib.mini check``.
The builder (and its torch/transformers training code) loads on first use, so importing a small piece such as
``llava_lib.mini.scenes`` stays cheap.
"""
from __future__ import annotations

import importlib

__all__ = ["MINI_URL_BASE", "BuildSpec", "build", "check", "url_rewrite"]


def __getattr__(name: str):
    if name in __all__:
        module = importlib.import_module(".build", __name__)
        # Loading the submodule ``build`` binds it as this package's attribute ``build``; the function wins.
        globals().update({n: getattr(module, n) for n in __all__})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
