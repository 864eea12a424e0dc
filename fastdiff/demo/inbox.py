"""A client's pending work: its control messages in order, and at most one frame, the newest."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

from .messages import ClientError, Control

MAX_PENDING_CONTROLS = 16


@dataclasses.dataclass(frozen=True)
class Frame:
    index: int  # the client's binary messages are numbered from 0 in arrival order
    image: Any  # a PIL image, header checked, pixels not yet decoded (messages.open_frame)
    received_s: float  # time.perf_counter() at arrival, for latency


class Inbox:
    """Work waiting for the compute thread, consumed in arrival order.

    A new frame replaces a frame still waiting (which is returned, to be reported as dropped), so
    a client that sends faster than its frames are processed never builds a queue: the frame
    processed next is always the newest. Control messages are never dropped; they keep their
    place relative to the frame, so a frame sent after a prompt change is generated with it.
    """

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._changed = asyncio.Event()

    def put_frame(self, frame: Frame) -> Frame | None:
        stale = next((item for item in self._items if isinstance(item, Frame)), None)
        if stale is not None:
            self._items.remove(stale)
        self._items.append(frame)
        self._changed.set()
        return stale

    def put_control(self, control: Control) -> None:
        if sum(isinstance(item, Control) for item in self._items) >= MAX_PENDING_CONTROLS:
            raise ClientError(f"{MAX_PENDING_CONTROLS} control messages are already waiting; send fewer")
        self._items.append(control)
        self._changed.set()

    def pop(self) -> Frame | Control | None:
        return self._items.popleft() if self._items else None

    async def wait(self) -> None:
        """Until something is put (returns at once if something is waiting)."""
        if not self._items:
            self._changed.clear()
            await self._changed.wait()
