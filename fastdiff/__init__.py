"""fastdiff: real-time acceleration for Hugging Face diffusers pipelines."""

__version__ = "0.1.0"

from .streaming import Stream  # noqa: E402

__all__ = ["Stream", "__version__"]
from .accelerate import accelerate  # noqa: E402

__all__ += ["accelerate"]
