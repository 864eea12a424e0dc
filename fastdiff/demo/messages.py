"""What a demo client may send, checked: JSON control messages and JPEG/WebP frames.

Everything here is pure: bytes or text in, a checked value or a :class:`ClientError` out. Nothing a
client sends is written anywhere or executed; images are only decoded, after their header's size
has been checked against the limit (so a small file cannot unpack into a huge bitmap).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import numbers

from PIL import Image, UnidentifiedImageError

MODES = ("img2img", "txt2img")
FORMATS = ("jpeg", "webp")
FRAME_FORMATS = ("JPEG", "WEBP")  # PIL's names for what clients may send
MIN_FRAME_SIDE = 16
MAX_TEXT_CHARS = 500  # prompts; the model's tokenizer has its own, tighter, limit
MAX_STEPS = 8  # denoising steps a client may ask for: one denoiser row each per frame
MAX_GUIDANCE = 20.0
SETTING_FIELDS = ("mode", "prompt", "negative_prompt", "guidance_scale", "steps", "format")
FIELDS = {"start": SETTING_FIELDS, "update": SETTING_FIELDS, "stop": ()}


class ClientError(ValueError):
    """Something a client sent cannot be used; reported to that client only.

    `field` names the offending field ("frame" for images); `index` is the frame's index."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None):
        super().__init__(message)
        self.field, self.index = field, index

    def to_message(self) -> dict:
        return {"type": "error", "message": str(self), "field": self.field, "index": self.index}


@dataclasses.dataclass(frozen=True)
class Control:
    kind: str  # "start", "update" or "stop"
    fields: dict  # checked settings, only those the message gave


def _reject_constant(name: str):
    raise ClientError(f"{name} is not a number JSON allows")


def parse_control(text: str) -> Control:
    """A control message: ``{"type": "start"|"update"|"stop", <settings>...}``."""
    try:
        message = json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        if isinstance(error, ClientError):
            raise
        raise ClientError(f"control message is not valid JSON: {error}") from None
    except RecursionError:
        raise ClientError("control message is nested too deeply to be a control message") from None
    if not isinstance(message, dict):
        raise ClientError(f"control message must be a JSON object, got {type(message).__name__}")
    kind = message.pop("type", None)
    if not isinstance(kind, str) or kind not in FIELDS:
        raise ClientError(f"type must be one of {sorted(FIELDS)}, got {kind!r}", field="type")
    unknown = sorted(set(message) - set(FIELDS[kind]))
    if unknown:
        raise ClientError(f"unknown field {unknown[0]!r} in a {kind!r} message; accepted: "
                          f"{', '.join(FIELDS[kind]) or 'none'}", field=unknown[0])
    return Control(kind, {name: CHECKS[name](value) for name, value in message.items()})


def _choice(name, choices):
    def check(value):
        if value not in choices:
            raise ClientError(f"{name} must be one of {choices}, got {value!r}", field=name)
        return value
    return check


def _text(name, allow_none):
    def check(value):
        if value is None and allow_none:
            return None
        if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
            raise ClientError(f"{name} must be a string of at most {MAX_TEXT_CHARS} characters", field=name)
        return value
    return check


def _guidance(value):
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0 <= value <= MAX_GUIDANCE):
        raise ClientError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE}], got {value!r}",
                          field="guidance_scale")
    return float(value)


def _steps(value):
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_STEPS
            or any(isinstance(s, bool) or not isinstance(s, int) for s in value)):
        raise ClientError(f"steps must be a list of 1 to {MAX_STEPS} integers, got {value!r}", field="steps")
    return tuple(value)  # their range and order are the stream's to check


CHECKS = {
    "mode": _choice("mode", MODES),
    "prompt": _text("prompt", allow_none=False),
    "negative_prompt": _text("negative_prompt", allow_none=True),
    "guidance_scale": _guidance,
    "steps": _steps,
    "format": _choice("format", FORMATS),
}


def open_frame(data: bytes, index: int, max_side: int) -> Image.Image:
    """A client's frame with its format and size checked from the header alone; the pixels are
    decoded later (:func:`decode_opened`), so a frame replaced by a newer one costs no decoding."""
    try:
        image = Image.open(io.BytesIO(data), formats=FRAME_FORMATS)
    except Image.DecompressionBombError:   # a small file whose header claims a huge picture
        raise ClientError(f"frame {index} claims a picture far larger than {max_side}×{max_side}", field="frame",
                          index=index) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ClientError(f"frame {index} is not a JPEG or WebP image", field="frame", index=index) from None
    width, height = image.size
    if not (MIN_FRAME_SIDE <= width <= max_side and MIN_FRAME_SIDE <= height <= max_side):
        raise ClientError(f"frame {index} is {width}×{height}; width and height must each be between "
                          f"{MIN_FRAME_SIDE} and {max_side}", field="frame", index=index)
    return image


def decode_opened(image: Image.Image, index: int) -> Image.Image:
    """An opened frame's pixels as an RGB image; a truncated or corrupt file fails here."""
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ClientError(f"frame {index} cannot be decoded: {error}", field="frame", index=index) from None


def encode_frame(image: Image.Image, fmt: str, quality: int = 85) -> bytes:
    """An output frame as JPEG or WebP bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), quality=quality)
    return buffer.getvalue()
