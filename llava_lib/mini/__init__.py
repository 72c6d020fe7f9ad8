"""The mini world: a small, seeded, offline world in which the whole pipeline really learns on a CPU. The builder
loads on first use, so importing ``llava_lib.mini.scenes`` stays cheap; ``build`` itself is not re-exported (the
submodule of that name would shadow it once imported): call ``llava_lib.mini.build.build``."""
__all__ = ["MINI_URL_BASE", "BuildSpec", "url_rewrite"]


def __getattr__(name: str):
    if name in __all__:
        from . import build
        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
