"""The shapes world: scenes of coloured shapes with captions, a deterministic reader that judges any
64×64 picture of one, and moving-shape clips for streams."""

from .clips import moving_shapes_clip
from .evaluate import attribute_accuracy, read_scene, read_scenes
from .render import (Obj, Scene, batch_tensors, caption, heldout_prompts, parse_caption, render,
                     render_batch, sample_scene, scene_stream, vocabulary)

__all__ = ["Obj", "Scene", "attribute_accuracy", "batch_tensors", "caption", "heldout_prompts",
           "moving_shapes_clip", "parse_caption", "read_scene", "read_scenes", "render", "render_batch",
           "sample_scene", "scene_stream", "vocabulary"]
