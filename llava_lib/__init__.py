"""llava_lib: the small library behind the LLaVA Stage-1 course notebooks.

Import what you need from the submodules (``llava_lib.config``, ``llava_lib.model``, ``llava_lib.train`` ...);
this package file stays light so that ``import llava_lib`` is instant.
"""
__version__ = "0.1.0"
