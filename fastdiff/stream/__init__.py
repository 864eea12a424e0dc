"""The stateful real-time part below the front doors: the batched latent stream, what a front door
prepares once, the similarity filter, the runner and its statistics."""

from .batch import LatentStream

__all__ = ["LatentStream"]
