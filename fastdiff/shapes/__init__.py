"""Synthetic images and clips of simple shapes, drawn offline for tests and demos."""

from .clips import moving_shapes_clip

__all__ = ["moving_shapes_clip"]
