"""Stochastic similarity filter: skip input frames that barely differ from the last processed one.

For a frame x and the last processed input r (both flattened, compared in float32):

    cos = ⟨x, r⟩ / (‖x‖·‖r‖)
    p   = max(0, 1 − (1 − cos) / (1 − threshold))        (clamped to ≤ 1)

so p = 1 for an identical frame, falls linearly to 0 at cos = threshold, and stays 0 below it.
The frame is skipped when u < p with u ~ U(0, 1) drawn from the filter's own seeded generator.
Drawing instead of cutting at the threshold avoids a hard edge where a slowly drifting scene would
freeze and then jump. At most `max_skip_frames` frames in a row are skipped, so even a static
scene is refreshed now and then.
"""

from __future__ import annotations

import torch

from ..checks import check_int, check_number

__all__ = ["SimilarityFilter"]


class SimilarityFilter:
    """Decide per frame whether it may be skipped (the previous output reused).

    Attributes: `skipped` and `processed` count decisions since construction or :meth:`reset`;
    `skip_run` is the number of consecutive skips ending at the latest frame.
    """

    def __init__(self, threshold: float = 0.98, max_skip_frames: int = 10, seed: int = 0):
        self.threshold = check_number(threshold, "threshold", 0.0, 1.0, low_open=True, high_open=True)
        check_int(max_skip_frames, "max_skip_frames", 0)
        self.max_skip_frames = max_skip_frames
        self.seed = seed
        self._generator = torch.Generator()
        self.reset()

    def reset(self) -> None:
        """Forget the reference frame, zero the counters and reseed: the filter is as new."""
        self._reference: torch.Tensor | None = None  # flat float32 copy of the last processed input
        self._reference_norm = 0.0
        self._shape: torch.Size | None = None
        self._generator.manual_seed(self.seed)
        self.skipped = 0
        self.processed = 0
        self.skip_run = 0

    def probability(self, frame: torch.Tensor) -> float:
        """The skip probability p of `frame` against the reference; draws nothing, changes nothing."""
        return self._measure(frame, self._flat(frame))[0]

    def _measure(self, frame: torch.Tensor, flat: torch.Tensor) -> tuple[float, float | None]:
        """(skip probability, the frame's norm — None when not measured) with one device sync."""
        if self._reference is None or frame.shape != self._shape or flat.device != self._reference.device:
            return 0.0, None
        dot, norm = torch.stack((torch.dot(flat, self._reference), torch.linalg.vector_norm(flat))).tolist()
        if norm == 0.0 or self._reference_norm == 0.0:
            # The angle is undefined; two all-zero frames are the same frame, one zero frame is not.
            cos = 1.0 if norm == self._reference_norm else 0.0
        else:
            cos = dot / (norm * self._reference_norm)
        p = 1.0 - (1.0 - cos) / (1.0 - self.threshold)
        return min(1.0, max(0.0, p)), norm

    def should_skip(self, frame: torch.Tensor) -> bool:
        """True: skip `frame` (reuse the previous output). False: process it; it becomes the reference.

        Never skips the first frame, a frame whose shape (or device) differs from the reference,
        or a frame that would make the run of consecutive skips longer than `max_skip_frames`.
        Each frame's norm is computed once, with the one device sync of its measurement.
        """
        flat, norm = self._flat(frame), None
        if self.skip_run < self.max_skip_frames:
            p, norm = self._measure(frame, flat)
            if p > 0.0 and torch.rand((), generator=self._generator).item() < p:
                self.skipped += 1
                self.skip_run += 1
                return True
        self._accept(frame, flat, norm)
        return False

    def accept(self, frame: torch.Tensor) -> None:
        """Record `frame` as processed without asking (a stream with no output to reuse yet)."""
        self._accept(frame, self._flat(frame), None)

    @staticmethod
    def _flat(frame: torch.Tensor) -> torch.Tensor:
        """`frame` flattened to float32 (a view when possible)."""
        return frame.detach().reshape(-1).to(torch.float32)

    def _accept(self, frame: torch.Tensor, flat: torch.Tensor, norm: float | None) -> None:
        # Copy only if `flat` still shares memory with the caller's frame (which may be reused).
        self._reference = flat.clone() if flat.data_ptr() == frame.data_ptr() else flat
        self._reference_norm = torch.linalg.vector_norm(flat).item() if norm is None else norm
        self._shape = frame.shape
        self.processed += 1
        self.skip_run = 0
