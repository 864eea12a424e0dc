"""One client's stream state: its settings, its `fastdiff.Stream`, and which output is whose.

A session's methods run on the server's compute thread, one at a time; they return the encoded
outputs ready to send. The stream lags its input by n−1 calls; each call is tagged with its
(index, arrival time) and the stream hands the tag back with that frame's output, as it does for
:class:`fastdiff.stream.runner.StreamRunner`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from PIL import ImageOps

from .inbox import Frame
from .messages import ClientError, Control, decode_opened, encode_frame


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    steps: tuple | None  # None: the mode's default steps
    format: str  # of the output frames

    def merged(self, fields: dict) -> "Settings":
        changed = dataclasses.replace(self, **fields)
        if changed.mode != self.mode and "steps" not in fields:  # each mode has its own default steps
            changed = dataclasses.replace(changed, steps=None)
        return changed


@dataclasses.dataclass(frozen=True)
class Output:
    index: int  # the input frame's index (img2img), or the generation's (txt2img)
    data: bytes  # the encoded image
    skipped: bool  # the stream's similarity filter reused the previous output
    started_s: float  # when its frame arrived (img2img) or its generation began (txt2img)


class Session:
    """`make_stream(settings)` builds a prepared stream; it raises ValueError on bad settings."""

    def __init__(self, make_stream: Callable[[Settings], object], settings: Settings):
        self.make_stream = make_stream
        self.settings = settings
        self.stream = None  # None until started, and after stop
        self._generations_wanted = 0  # txt2img: calls left before the image shows the settings
        self._next_generation = 0

    @property
    def wants_generation(self) -> bool:
        return self.stream is not None and self.settings.mode == "txt2img" and self._generations_wanted > 0

    def apply(self, control: Control) -> tuple[list[Output], dict]:
        """Start, change or stop the stream; (the outputs it finished on the way, the reply)."""
        if control.kind == "stop":
            outputs = self._finish()
            self.stream = None
            return outputs, {"type": "stopped"}
        if control.kind == "update" and self.stream is None:
            raise ClientError('update before start: send {"type": "start"} first', field="type")
        settings = self.settings.merged(control.fields)
        # a stream keeps a side of its prompt that an update leaves out: a cleared negative prompt is a new stream
        cleared = settings.negative_prompt is None and self.settings.negative_prompt is not None
        if control.kind == "start" or settings.mode != self.settings.mode or cleared:
            stream = self._make(settings)  # before finishing the old one: bad settings leave it running
            outputs = self._finish()
            self.stream = stream
        else:
            outputs = self._update(control.fields)
        self.settings = settings
        if settings.mode == "txt2img":
            self._generations_wanted = self.stream.lag + 1  # the last one used the new settings all along
        reply = {"type": "started" if control.kind == "start" else "updated", "settings": self.public_settings(),
                 "lag": self.stream.lag, "width": self.stream.width, "height": self.stream.height}
        return outputs, reply

    def public_settings(self) -> dict:
        settings = dataclasses.asdict(self.settings)
        if self.stream is not None:   # None when the stream runs explicit (e.g. searched) timesteps
            settings["steps"] = list(self.stream.steps) if self.stream.steps is not None else None
        return settings

    def process(self, frame: Frame) -> list[Output]:
        """Run one img2img frame; the outputs it finished (none while the stream fills)."""
        if self.stream is None:
            raise ClientError(f'frame {frame.index} arrived before start: send {{"type": "start"}} first',
                              field="frame", index=frame.index)
        if self.settings.mode != "img2img":
            raise ClientError(f"frame {frame.index} sent in txt2img mode, which takes no frames",
                              field="frame", index=frame.index)
        image = ImageOps.fit(decode_opened(frame.image, frame.index), (self.stream.width, self.stream.height))
        out = self._run(lambda: self.stream(image, tag=(frame.index, frame.received_s)), "frame", frame.index)
        return self._collect(out)

    def generate(self) -> list[Output]:
        """One txt2img call; the image it finished (none while the stream fills)."""
        self._generations_wanted -= 1
        tag = (self._next_generation, time.perf_counter())
        self._next_generation += 1
        return self._collect(self._run(lambda: self.stream(tag=tag), "prompt"))

    # -- bookkeeping -------------------------------------------------------------------------------
    def _make(self, settings: Settings):
        return self._run(lambda: self.make_stream(settings), None)

    def _update(self, fields: dict) -> list[Output]:
        names = ("prompt", "negative_prompt", "guidance_scale", "steps")
        changes = {name: list(value) if name == "steps" else value
                   for name, value in fields.items() if name in names}
        if not changes:
            return []
        # a new shape finishes the frames in flight first: they come back with their tags
        return self._tagged(self._run(lambda: self.stream.update(**changes, with_tags=True), None))

    @staticmethod
    def _run(call, field, index=None):
        """The library names a bad argument in its ValueError; the client gets it as an error."""
        try:
            return call()
        except ValueError as error:
            name = str(error).split(" ", 1)[0]
            field = name if name in Settings.__annotations__ else field
            raise ClientError(str(error), field=field, index=index) from error

    def _collect(self, out) -> list[Output]:
        if out is None:
            return []
        return [self._output(self.stream.last_tag, out, skipped=self.stream.last_skipped)]

    def _tagged(self, finished: list) -> list[Output]:
        return [self._output(tag, image, skipped=False) for tag, image in finished]

    def _finish(self) -> list[Output]:
        """Flush the frames in flight, so none is lost when the stream is replaced or stopped."""
        if self.stream is None:
            return []
        return self._tagged(self.stream.flush_tagged())

    def _output(self, entry, image, skipped: bool) -> Output:
        index, started_s = entry
        return Output(index, encode_frame(image, self.settings.format), skipped, started_s)
