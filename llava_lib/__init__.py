"""llava_lib, the small library behind the LLaVA course notebooks: import from its submodules (``llava_lib.config``,
``llava_lib.train`` ...); this file stays light so that ``import llava_lib`` is instant."""
__version__ = "0.1.0"
