"""The shapes world: scenes of coloured shapes with captions, a deterministic reader that judges any
64×64 picture of one, and moving-shape clips for streams."""

from .clips import moving_shapes_clip
from .model import load_pipeline
from .evaluate import attribute_accuracy, read_scene, read_scenes
from .render import (Obj, Scene, batch_tensors, caption, heldout_prompts, parse_caption, render,
                     render_batch, sample_scene, scene_stream, vocabulary)

__all__ = ["Obj", "Scene", "artefact_path", "attribute_accuracy", "load_pipeline", "batch_tensors", "caption", "heldout_prompts",
           "moving_shapes_clip", "parse_caption", "read_scene", "read_scenes", "render", "render_batch",
           "sample_scene", "scene_stream", "vocabulary"]


def artefact_path(kind: str) -> str:
    """Where the tuning artefacts shipped for the embedded model live: ``"schedule"`` (a folder of
    searched step schedules, ``shapes-K.json``), ``"onestep"`` (the one-step adapter) and
    ``"router"`` (the prompt router and its pruned sub-networks)."""
    import os

    kinds = ("schedule", "onestep", "router")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "artefacts", kind)
