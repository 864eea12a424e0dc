"""A ControlNet pipeline call's control arguments, checked and laid out as diffusers reads them:
the control images (one per ControlNet), each net's conditioning scale, the share of the steps
each acts on (``control_guidance_start`` / ``end``) and guess mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_number
from .images import check_finite, preprocessed


@dataclass
class ControlInputs:
    """A call's control, checked: `images` one [n, 3, H, W] per condition (per net, but a Union net
    alone takes several; n: 1 or one per prompt), as the pipeline makes them (:func:`control_images`)."""

    images: list
    scales: list
    starts: list
    ends: list
    guess_mode: bool
    modes: list | None = None   # Union nets': each condition's kind of control (None: none)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.images[0].shape[-2:])

    def rows(self, prompts: int, per_prompt: int) -> list[torch.Tensor]:
        """Each net's images as one row per image of the call (prompts × per_prompt), as diffusers
        repeats them: one image for all, or one per prompt."""
        return control_rows(self.images, prompts, per_prompt, "prompts")

    def keep(self, timesteps) -> dict:
        """{timestep: [1.0 or 0.0 per net]}: whether each net acts at each of the call's steps, by
        where the step falls in the call (diffusers' rule)."""
        n = len(timesteps)
        return {float(t): [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(self.starts, self.ends)]
                for i, t in enumerate(timesteps)}


def control_rows(images: list, count: int, per: int, what: str) -> list[torch.Tensor]:
    """Each net's images as `count` × `per` rows: one image repeated for all, or one per `what`
    (prompts, frames) repeated `per` times each."""
    out = []
    for image in images:
        if image.shape[0] not in (1, count):
            raise ValueError(f"control image: {image.shape[0]} images for {count} {what}; give one, or one per "
                             f"{what[:-1]}")
        out.append(image.repeat_interleave(count * per if image.shape[0] == 1 else per, dim=0))
    return out


def control_inputs(pipe, nets: int, image, scale, start, end, guess_mode, height, width, name: str) -> ControlInputs:
    """The call's control arguments checked (`name`: the argument holding the control images)."""
    images = control_images(pipe, nets, image, height, width, name)
    scales = check_scales(scale, nets)
    starts = _per_net(start, nets, "control_guidance_start")
    ends = _per_net(end, nets, "control_guidance_end")
    for s, e in zip(starts, ends):
        check_number(s, "control_guidance_start", 0.0, 1.0)
        check_number(e, "control_guidance_end", 0.0, 1.0)
        if s >= e:
            raise ValueError(f"control_guidance_start ({s}) must be below control_guidance_end ({e})")
    if not isinstance(guess_mode, bool):
        raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
    return ControlInputs(images, scales, starts, ends, guess_mode)


def check_scales(scale, nets: int) -> list:
    """Each net's conditioning scale: one number for all, or a list of one per net."""
    scales = _per_net(scale, nets, "controlnet_conditioning_scale")
    for s in scales:
        check_number(s, "controlnet_conditioning_scale")
    return scales


def control_images(pipe, nets: int, image, height, width, name: str) -> list[torch.Tensor]:
    """One [n, 3, H, W] tensor per net (a list of images with several nets), as the pipeline's
    control image processor makes them, at `height` × `width` (None: the image's own size)."""
    if image is None:
        raise ValueError(f"{name} is required by {type(pipe).__name__} (its ControlNet's condition)")
    many = image if nets > 1 else [image]
    if nets > 1 and (not isinstance(image, (list, tuple)) or len(image) != nets):
        raise ValueError(f"{name}: {nets} ControlNets take a list of {nets} control images (one per net)")
    images = []
    for one in many:
        if one is None or isinstance(one, (str, bytes)):
            raise ValueError(f"{name} must be an image (PIL, array or tensor) or a list of them, got {one!r}")
        images.append(_control_pixels(pipe, one, name, height, width).to(dtype=torch.float32))
    if len({tuple(p.shape[-2:]) for p in images}) > 1:
        raise ValueError(f"{name}: the control images differ in size {[tuple(p.shape[-2:]) for p in images]}; give "
                         "height and width, or images of one size")
    return images


def _control_pixels(pipe, image, name: str, height, width) -> torch.Tensor:
    """One control image as its pipeline takes it: through its control image processor, in [0, 1]
    (the UNets' ControlNet pipelines); SD3's and FLUX.1's, which have none, through the image
    processor, in [-1, 1], a tensor as it is (the VAE's or the net's input)."""
    processor = getattr(pipe, "control_image_processor", None)
    if processor is not None:
        return preprocessed(processor, image, name, height, width)
    if isinstance(image, torch.Tensor):
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"{name}: a tensor is taken as it is, [n, 3, H, W] in [-1, 1] (as "
                             f"{type(pipe).__name__} takes it); got {tuple(image.shape)}")
        check_finite(image, name)
        return image
    return preprocessed(pipe.image_processor, image, name, height, width)


def _per_net(value, nets: int, name: str) -> list:
    """One value for every net, or a list of one per net."""
    if isinstance(value, (list, tuple)):
        if len(value) != nets:
            raise ValueError(f"{name}: {len(value)} values for {nets} ControlNet{'s' if nets > 1 else ''}")
        return list(value)
    return [value] * nets
