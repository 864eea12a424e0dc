"""Model names the command line resolves to pipelines, offline where it can."""

from __future__ import annotations

import os

import torch

# models the build can make offline: the embedded model, the tiny test pipelines, and the real
# architectures with random weights (for timing builds and engines without downloading weights)
OFFLINE_MODELS = ("shapes", "tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "sd15", "sd-turbo", "sdxl", "sd3")


def load_model(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A pipeline from one of :data:`OFFLINE_MODELS`, a local diffusers folder, or a hub id."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be one of {OFFLINE_MODELS}, a pipeline folder or a hub id, got {model!r}")
    from . import architectures

    if model == "shapes":
        from .shapes.model import load_pipeline
        return load_pipeline(torch_dtype=dtype, device=device)
    makers = {"tiny": lambda: architectures.tiny_sd_pipeline(scheduler="lcm"),   # streams take LCM's step
              "tiny-sdxl": architectures.tiny_sdxl_pipeline, "tiny-sd3": architectures.tiny_sd3_pipeline,
              "tiny-flux": architectures.tiny_flux_pipeline}
    if model in makers:
        return makers[model]().to(device=device, dtype=dtype)
    if model in architectures.ARCHITECTURES:
        return architectures.ARCHITECTURES[model].pipeline(torch_dtype=dtype, device=device)
    path = os.path.expanduser(model)
    looks_local = model.startswith(("/", ".", "~")) or os.path.isdir(path)   # a path: never ask the hub
    if looks_local and not os.path.isdir(path):
        raise ValueError(f"model: no pipeline folder at {model}")
    if looks_local and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"model: {model} is a folder but not a diffusers pipeline (no model_index.json in it)")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
    except (OSError, ValueError) as error:
        if looks_local:
            raise ValueError(f"model: cannot load the pipeline in {model}: {error}") from error
        raise ValueError(f"model: {model!r} is none of {', '.join(OFFLINE_MODELS)}, no local folder, and no hub id "
                         "that could be loaded (not in the local cache, and the hub is not reachable or has no "
                         "such model)") from error
