"""Model names the command line resolves to pipelines, offline where it can."""

from __future__ import annotations

import os

import torch

# models the build can make offline: the embedded model, the tiny test pipelines, and the real
# architectures with random weights (for timing builds and engines without downloading weights)
OFFLINE_MODELS = ("shapes", "tiny", "tiny-sdxl", "tiny-sd3", "sd15", "sd-turbo", "sdxl", "sd3")


def load_model(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A pipeline from one of :data:`OFFLINE_MODELS`, a local diffusers folder, or a hub id."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be one of {OFFLINE_MODELS}, a pipeline folder or a hub id, got {model!r}")
    from . import architectures

    if model == "shapes":
        from .shapes.model import load_pipeline
        return load_pipeline(torch_dtype=dtype, device=device)
    makers = {"tiny": lambda: architectures.tiny_sd_pipeline(scheduler="lcm"),   # streams take LCM's step
              "tiny-sdxl": architectures.tiny_sdxl_pipeline, "tiny-sd3": architectures.tiny_sd3_pipeline}
    if model in makers:
        return makers[model]().to(device=device, dtype=dtype)
    if model in architectures.ARCHITECTURES:
        return architectures.ARCHITECTURES[model].pipeline(torch_dtype=dtype, device=device)
    looks_local = model.startswith(("/", ".", "~"))   # a path, not a hub id: never ask the hub
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise ValueError(f"model: no pipeline folder at {model}")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(os.path.expanduser(model), torch_dtype=dtype).to(device)
    except (OSError, ValueError) as error:
        raise ValueError(f"model: cannot load a pipeline from {model!r} ({error})") from error
