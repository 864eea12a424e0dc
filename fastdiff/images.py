"""Frames in and out: PIL images, numpy arrays and tensors ⇄ [B, 3, H, W] tensors in [0, 1] (the
codec's frame paths take and give those; :func:`signed` makes diffusers' [-1, 1] of them)."""

from __future__ import annotations

import math

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


def all_finite(values) -> bool:
    """Whether a float tensor or array holds no NaN or ±Inf. NaN and ±Inf carry through a sum, so
    one wide sum answers in the common case (a fifth of the cost of an elementwise test on a 64²
    frame); only a sum that is not finite — non-finite values, or finite ones too large to add up —
    takes the exact elementwise test."""
    if isinstance(values, np.ndarray):
        return bool(np.isfinite(values.sum(dtype=np.float64)) or np.isfinite(values).all())
    return math.isfinite(values.sum(dtype=torch.float32).item()) or bool(torch.isfinite(values).all())


def check_finite(values, name: str) -> None:
    """ValueError naming `name` when a float array or tensor holds NaN or ±Inf. A host array is
    checked before it moves (no device sync); a device tensor costs one reduction."""
    if isinstance(values, np.ndarray):
        bad = values.dtype.kind == "f" and not all_finite(values)
    elif isinstance(values, torch.Tensor):
        bad = values.is_floating_point() and not all_finite(values)
    else:
        return
    if bad:
        raise ValueError(f"{name} holds NaN or infinite values")


def preprocessed(processor, image, name: str, height=None, width=None, **crop) -> torch.Tensor:
    """`image` as a diffusers image processor makes it (PIL, arrays, tensors, or lists of them), its
    values checked finite; what the processor can't read is a ValueError naming `name`. `crop`: the
    processor's ``resize_mode`` and ``crops_coords``."""
    try:
        pixels = processor.preprocess(image, height=height, width=width, **crop)
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(f"{name} must be an image (PIL, array or tensor) or a list of them: {error}") from None
    check_finite(pixels, name)
    return pixels


def check_unit_range(values, name: str) -> None:
    """ValueError naming `name` unless a float frame's values are finite and in [0, 1] (a hair of
    slack for a resampler's overshoot): one min-max reduction, which NaN and ±Inf fail as well."""
    if isinstance(values, np.ndarray):
        low, high = float(values.min()), float(values.max())
    else:
        low, high = torch.stack(torch.aminmax(values)).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} holds NaN or infinite values; a frame or image must be finite")
    if low < -0.01 or high > 1.01:
        raise ValueError(f"{name} holds values from {low:g} to {high:g}; float frames are in [0, 1] "
                         "(0–255 values: pass them as uint8, or divide by 255)")


class FiniteWatch:
    """Reports, once per component, outputs that turned non-finite inside the model (fp16 overflow,
    say), naming the component: nothing is streamed as garbage without a word."""

    def __init__(self):
        self.reported: set = set()

    def check(self, latents: torch.Tensor, images: torch.Tensor) -> None:
        """One reduction over the decoded `images` (before any conversion clamps ±Inf away)."""
        if all_finite(images):
            return
        component = "denoiser" if not all_finite(latents) else "vae_decoder"
        if component not in self.reported:
            import warnings

            self.reported.add(component)
            hint = (" (fp16 overflow: run it in fp32 — the VAE's force_upcast, or engine_options "
                    "precision={'vae_decoder': 'fp32'})" if component == "vae_decoder" else "")
            warnings.warn(f"the {component} produced NaN or infinite values{hint}", RuntimeWarning, stacklevel=3)


_SHIFTS: dict = {}   # 0-dim tensors: torch.add(shift, x, alpha=scale) is one kernel


def affine(images: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """scale·images + shift as one op (a new tensor)."""
    if torch.compiler.is_compiling():   # fused there anyway; a CPU constant would keep CUDA graphs off
        return images * scale + shift
    constant = _SHIFTS.get(shift)
    if constant is None:
        constant = _SHIFTS[shift] = torch.tensor(shift)
    return torch.add(constant, images, alpha=scale)


def signed(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → [-1, 1] (a new tensor)."""
    return affine(images, 2.0, -1.0)


def to_model_tensor(image, height: int, width: int, device, dtype, name: str = "image") -> torch.Tensor:
    """One frame as a [1, 3, H, W] tensor in [0, 1] (possibly the caller's own tensor: read it, never
    write it); its size must be exactly height×width, and a float frame's values finite and in
    [0, 1] (checked on the host before the transfer, where it comes from the host)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"{name} must be an RGB image, got mode {image.mode!r}")
        image = np.array(image)   # a writable copy: torch refuses read-only arrays
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name} must be an [H, W, 3] array, got shape {image.shape}")
        if image.dtype.kind == "f":
            check_unit_range(image, name)
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor) and image.is_floating_point():
        check_unit_range(image, name)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be one of: {'; '.join(ACCEPTED)}; got {type(image).__name__}")
    batched = image.dim() == 4 and image.shape[0] == 1   # kept 4-D: no view ops on the way (a frame's hot path)
    shape = tuple(image.shape[1:] if batched else image.shape)
    if len(shape) != 3 or shape[0] != 3:
        raise ValueError(f"{name} must have 3 channels first ([3, H, W] or [1, 3, H, W]), got shape {tuple(image.shape)}")
    if shape[1:] != (height, width):
        raise ValueError(f"{name} is {shape[2]}×{shape[1]} (W×H) but the stream is prepared "
                         f"for {width}×{height}; resize it, or change the stream's resolution")
    if image.dtype == torch.uint8:   # a new tensor: scaled in place
        image = image.to(device=device, dtype=dtype).div_(255)
    elif image.is_floating_point():
        if image.dtype != dtype or image.device != device:
            image = image.to(device=device, dtype=dtype)
    else:
        raise ValueError(f"{name} must hold uint8 or floating-point values, got {image.dtype}")
    return image if batched else image.unsqueeze(0)


def from_model_tensor(images: torch.Tensor, output_type: str):
    """[B, 3, H, W] in [0, 1], not yet clamped (the decoder's own fresh tensor: clamped in place) → a
    list of B images: PIL, float32 [H, W, 3] arrays, or [3, H, W] tensors in [0, 1]."""
    images = (images if images.dtype == torch.float32 else images.float()).clamp_(0, 1)
    if output_type == "pt":
        return list(images.unbind(0))
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return list(arrays)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]
