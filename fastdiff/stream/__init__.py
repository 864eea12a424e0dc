"""The stateful real-time part: the batched latent stream, the frame-level Stream, filter and runner."""

from .batch import LatentStream
from .stream import Stream

__all__ = ["LatentStream", "Stream"]
