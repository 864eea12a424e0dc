"""A call's (or a stream's) other prompts and size conditioning, checked and laid out as the wrapped
pipeline class lays them out: SDXL's and SD3's prompts for their other text encoders, the text
encoders' layer to read (``clip_skip``), SD3's T5 length, and SDXL's size and crop conditioning
(the refiner's aesthetic scores). Both front doors take them by diffusers' names, where the pipeline
class's own call takes them, and hand the result to the denoiser's prompt encoding."""

from __future__ import annotations

import inspect

from .checks import check_int, check_number

TEXT_OPTIONS = ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3", "clip_skip", "max_sequence_length")
SIZE_CONDITIONS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                   "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                   "negative_aesthetic_score")


def call_defaults(pipe) -> dict:
    """{argument: default} of the pipeline class's own call (`pipe` a pipeline or its class)."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    return {k: p.default for k, p in inspect.signature(cls.__call__).parameters.items()}


def pipeline_task(pipe) -> str:
    """"img2img" for a pipeline class that starts from an image (inpainting too), else "txt2img"."""
    name = type(pipe).__name__
    return "img2img" if "Img2Img" in name or "Inpaint" in name else "txt2img"


def prompt_options(pipe, family: str, defaults: dict, given: dict, height: int, width: int,
                   backend: str | None = None, task: str | None = None) -> dict:
    """The denoiser's encoding options (see ``Denoiser.encode_prompt``) of the `given` other prompts
    and size conditions (None-less), checked; `defaults` the pipeline class's call's, `task` its kind
    (default :func:`pipeline_task`'s)."""
    texts = {k: v for k, v in given.items() if k in TEXT_OPTIONS}
    if "clip_skip" in texts:
        check_clip_skip(pipe, family, texts["clip_skip"])
    if "max_sequence_length" in texts:
        check_sequence_length(texts["max_sequence_length"], defaults, backend)
    conditions = {k: v for k, v in given.items() if k in SIZE_CONDITIONS}
    return {**texts, **time_ids(pipe, task or pipeline_task(pipe), defaults, conditions, height, width)}


def check_clip_skip(pipe, family: str, clip_skip) -> None:
    """Layers skipped from the text encoders' end: as many as the shallowest has (SDXL and SD3 read
    the penultimate layer already, so one fewer)."""
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
    layers = min(e.config.num_hidden_layers for e in encoders if e is not None)
    check_int(clip_skip, "clip_skip", 0, layers - (family != "unet"))


def check_sequence_length(length, defaults: dict, backend: str | None) -> None:
    """SD3's T5 tokens (diffusers' bound, 512); engines are built for the default 256."""
    length = check_int(length, "max_sequence_length", 1, 512)
    if length != defaults["max_sequence_length"] and backend is not None:
        raise ValueError(f"max_sequence_length: the {backend} engines take the prompt at "
                         f"{defaults['max_sequence_length']} T5 tokens; {length} needs the PyTorch modules")


def time_ids(pipe, task: str, defaults: dict, given: dict, height: int, width: int) -> dict:
    """SDXL's size conditioning that sets some of it, as the pipeline class (of `task`) lays it out
    ({} when none is set: the denoiser's defaults, the image size)."""
    if not given:
        return {}
    value = lambda name: given.get(name, defaults.get(name))
    pair = lambda name, low: None if value(name) is None else check_pair(value(name), name, low)
    original = pair("original_size", 1) or (height, width)
    crops = pair("crops_coords_top_left", 0)
    target = pair("target_size", 1) or (height, width)
    neg_original, neg_crops, neg_target = (pair("negative_original_size", 1), pair("negative_crops_coords_top_left", 0),
                                           pair("negative_target_size", 1))
    if task == "img2img":
        neg_original, neg_target = neg_original or original, neg_target or target
        if pipe.config.get("requires_aesthetics_score", False):
            score = check_number(value("aesthetic_score"), "aesthetic_score")
            neg_score = check_number(value("negative_aesthetic_score"), "negative_aesthetic_score")
            return {"time_ids": [*original, *crops, score], "negative_time_ids": [*neg_original, *neg_crops, neg_score]}
        # diffusers' img2img pairs the negative sizes with the positive crops
        return {"time_ids": [*original, *crops, *target], "negative_time_ids": [*neg_original, *crops, *neg_target]}
    ids = [*original, *crops, *target]
    if given.get("negative_original_size") is None or given.get("negative_target_size") is None:
        return {"time_ids": ids, "negative_time_ids": ids}   # the negative sizes count only as a pair
    return {"time_ids": ids, "negative_time_ids": [*neg_original, *neg_crops, *neg_target]}


def check_pair(value, name: str, low: int) -> tuple[int, int]:
    """A (height, width) or (top, left) pair of whole numbers ≥ `low`."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2 \
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value):
        raise ValueError(f"{name} must be a pair of whole numbers ≥ {low}, got {value!r}")
    return tuple(value)
