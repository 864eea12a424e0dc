"""Engines: export, build, cache and run the hot modules of a pipeline.

- :mod:`.components` describes what can be exported (denoiser, VAE halves, text encoders);
- :mod:`.onnx_export` writes ONNX; :mod:`.ort`, :mod:`.tensorrt`, :mod:`.inductor` are the backends;
- :mod:`.backends` is the one interface over them, :mod:`.cache` the engine cache;
- :mod:`.modules` dresses an engine as the module it replaces, :mod:`.attach` swaps it in;
- :mod:`.build` is the engine build script (``fastdiff build``, ``engines/build.py``).
"""

from .backends import BACKENDS, PRECISIONS, engine, pick_backend, resolve_backend
from .cache import StaleEngineError, default_cache_dir
from .components import COMPONENTS, component
from .profiles import ShapeProfile, stream_profile

__all__ = ["BACKENDS", "PRECISIONS", "COMPONENTS", "ShapeProfile", "StaleEngineError", "component", "engine",
           "default_cache_dir", "pick_backend", "resolve_backend", "stream_profile"]
