"""The mini world: a small, seeded, offline world in which the whole pipeline really learns on a CPU.

Build it with ``python -m llava_lib.mini build``; check it with ``python -m llava_lib.mini check``.
"""
from .build import MINI_URL_BASE, BuildSpec, build, check, url_rewrite

__all__ = ["MINI_URL_BASE", "BuildSpec", "build", "check", "url_rewrite"]
