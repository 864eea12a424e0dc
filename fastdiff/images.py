"""Frames in and out: PIL images, numpy arrays and tensors ⇄ [B, 3, H, W] tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ACCEPTED = ("PIL.Image.Image (RGB)", "numpy uint8/float array [H, W, 3]",
            "torch uint8/float tensor [3, H, W] or [1, 3, H, W] with floats in [0, 1]")


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def to_model_tensor(image, height: int, width: int, device, dtype, name: str = "image") -> torch.Tensor:
    """One frame as a [1, 3, H, W] tensor in [-1, 1]; its size must be exactly height×width."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"{name} must be an RGB image, got mode {image.mode!r}")
        image = np.array(image)   # a writable copy: torch refuses read-only arrays
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name} must be an [H, W, 3] array, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be one of: {'; '.join(ACCEPTED)}; got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} must have 3 channels first ([3, H, W] or [1, 3, H, W]), got shape {tuple(image.shape)}")
    if tuple(image.shape[1:]) != (height, width):
        raise ValueError(f"{name} is {image.shape[2]}×{image.shape[1]} (W×H) but the stream is prepared "
                         f"for {width}×{height}; resize it, or change the stream's resolution")
    if image.dtype == torch.uint8:
        image = image.to(device=device, dtype=dtype) / 127.5 - 1
    elif image.is_floating_point():
        image = image.to(device=device, dtype=dtype) * 2 - 1
    else:
        raise ValueError(f"{name} must hold uint8 or floating-point values, got {image.dtype}")
    return image.unsqueeze(0)


def from_model_tensor(images: torch.Tensor, output_type: str):
    """[B, 3, H, W] in [-1, 1] → a list of B images: PIL, float32 [H, W, 3] arrays, or [3, H, W] tensors in [0, 1]."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return list(images)
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return list(arrays)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]
