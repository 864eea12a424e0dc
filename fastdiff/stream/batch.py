"""Stream batching over latents: every denoising step of several frames in one denoiser call.

The stream holds n slots of F frames. Slot i is at the stream's timestep τ_i; a new group of F
frames enters slot 0 and, one call later, moves to slot 1, and so on; a group leaves finished
after slot n−1. Each call therefore carries n·F rows (fewer while the stream fills or drains: only
slots holding frames are computed) and returns the group that entered n−1 calls before.

Rows are slot-major: rows [i·F, (i+1)·F) are slot i's frames. Each row takes one step from τ_i
to τ_{i+1} (see :mod:`fastdiff.sampling.solvers`), and the buffer shifts by F rows — a whole
slot — per call, whatever n and F are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Conditioning, Denoiser
from ..sampling.guidance import check_mode, full_guidance, guided_self, next_residual, safe_ratio
from ..sampling.schedule import StepSchedule
from ..sampling.solvers import advance, consistency_x0, to_x0_eps

NOISE_MODES = ("fixed", "fresh")


@dataclass
class StreamState:
    """What is in flight: for each of slots 1..n−1 (index j ↔ slot j+1) its latents and residuals."""

    latents: list
    residuals: list

    @classmethod
    def empty(cls, n: int) -> "StreamState":
        return cls([None] * (n - 1), [None] * (n - 1))

    @property
    def occupied(self) -> list[int]:
        return [j for j, x in enumerate(self.latents) if x is not None]


@dataclass
class _Rows:
    """Everything about one call's rows that depends only on which slots are occupied."""

    slots: tuple
    t_model: torch.Tensor        # timesteps of the model batch (unconditional rows first)
    cond_model: Conditioning
    alpha: torch.Tensor
    beta: torch.Tensor
    alpha_next: torch.Tensor
    beta_next: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    ratio: torch.Tensor             # α'/β' (0 for rows leaving the stream)
    beta_over_alpha: torch.Tensor   # β/α (0 for flow rows at σ = 1)
    noise_rows: torch.Tensor   # flat index into noise[n·F] of each row's re-noising draw (LCM)


class LatentStream:
    """The batched denoising core. `push` a group of F frames, get back the finished group.

    Output lags input by n−1 calls: `push` returns None until the stream is full, and `drain`
    returns the groups still in flight.
    """

    def __init__(self, denoiser: Denoiser, schedule: StepSchedule, cond: Conditioning,
                 uncond: Conditioning | None, latent_shape: tuple[int, int, int], *, cfg: str = "none",
                 guidance_scale: float = 1.0, delta: float = 1.0, noise: str = "fixed",
                 generator: torch.Generator | None = None):
        self.denoiser = denoiser
        self.schedule = schedule
        self.cfg = check_mode(cfg)
        if cfg != "none" and uncond is None:
            raise ValueError(f"cfg={cfg!r} needs unconditional embeddings")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.noise_mode = noise
        self.guidance_scale = guidance_scale
        self.delta = delta
        self.latent_shape = tuple(latent_shape)
        self.generator = generator
        self.device, self.dtype = denoiser.device, denoiser.dtype
        self.set_conditioning(cond, uncond)
        self.state = StreamState.empty(self.n)
        self.noise = None        # [n, F, C, h, w]: ε_i injected at slot 0 / re-noising into slot i
        self.calls = 0

    # -- configuration -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.schedule)

    @property
    def frames(self) -> int:
        return len(self.cond)

    @property
    def rows_per_call(self) -> int:
        extra = {"none": 0, "full": self.n, "self": 0, "initialize": 1}[self.cfg]
        return (self.n + extra) * self.frames

    @property
    def in_flight(self) -> int:
        """Groups of frames inside the stream, waiting for their remaining steps."""
        return len(self.state.occupied)

    def set_conditioning(self, cond: Conditioning, uncond: Conditioning | None):
        """New prompt embeddings, used from the next call on by the frames in flight too."""
        if uncond is not None and len(uncond) != len(cond):
            raise ValueError(f"uncond has {len(uncond)} rows, cond has {len(cond)}")
        self.cond = cond.to(self.device, self.dtype)
        self.uncond = uncond.to(self.device, self.dtype) if uncond is not None else None
        self._rows_cache: dict = {}

    def _refresh_noise(self, needed: bool):
        """Fixed noise is drawn once; fresh noise is drawn again for every call that uses it."""
        if needed and (self.noise is None or self.noise_mode == "fresh"):
            shape = (self.n, self.frames) + self.latent_shape
            gen_device = self.generator.device if self.generator is not None else "cpu"
            eps = torch.randn(shape, generator=self.generator, device=gen_device, dtype=torch.float32)
            self.noise = eps.to(self.device, self.dtype)

    def _rows(self, new: bool, occupied: tuple) -> _Rows:
        key = (new, occupied)
        if key not in self._rows_cache:
            self._rows_cache[key] = self._build_rows(new, occupied)
        return self._rows_cache[key]

    def _build_rows(self, new: bool, occupied: tuple) -> _Rows:
        s, F, n = self.schedule, self.frames, self.n
        slots = ((0,) if new else ()) + tuple(j + 1 for j in occupied)
        index = torch.tensor(slots).repeat_interleave(F)

        def per_row(values):
            return values[index].to(self.device, self.dtype).view(-1, 1, 1, 1)

        t = s.timesteps[index].to(self.device, torch.float32)
        cond = self.cond.tile(len(slots))
        if self.cfg == "full":
            t_model, cond_model = torch.cat([t, t]), Conditioning.cat([self.uncond.tile(len(slots)), cond])
        elif self.cfg == "initialize" and new:
            t_model, cond_model = torch.cat([t[:F], t]), Conditioning.cat([self.uncond, cond])
        else:
            t_model, cond_model = t, cond
        return _Rows(
            slots=slots, t_model=t_model, cond_model=cond_model,
            alpha=per_row(s.alpha), beta=per_row(s.beta),
            alpha_next=per_row(s.alpha_next), beta_next=per_row(s.beta_next),
            c_skip=per_row(s.c_skip), c_out=per_row(s.c_out),
            ratio=per_row(safe_ratio(s.alpha_next, s.beta_next)),
            beta_over_alpha=per_row(safe_ratio(s.beta, s.alpha)),
            noise_rows=((index + 1).clamp(max=n - 1) * F + torch.arange(F).repeat(len(slots))).to(self.device),
        )

    # -- the call ------------------------------------------------------------------------------
    def push(self, clean: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """Enter one group of F frames at τ_0; returns the finished group's latents, or None.

        img2img: x = α_0·clean + β_0·ε_0. txt2img (`clean` None): x = noise_scale·ε_0.
        ε_0 is the stream's own noise for slot 0 unless `noise` is given.
        """
        self._refresh_noise(needed=noise is None or self.schedule.solver == "lcm")
        eps0 = self.noise[0] if noise is None else noise.to(self.device, self.dtype)
        shape = (self.frames,) + self.latent_shape
        if tuple(eps0.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(eps0.shape)}")
        if clean is None:
            x_new = self.schedule.noise_scale * eps0
        else:
            if tuple(clean.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(clean.shape)}")
            a0, b0 = float(self.schedule.alpha[0]), float(self.schedule.beta[0])
            x_new = a0 * clean.to(self.device, self.dtype) + b0 * eps0
        return self._step(x_new, eps0)

    def drain(self) -> list[torch.Tensor]:
        """Run the frames in flight to the end (no new input); their latents, oldest first."""
        finished = []
        while self.in_flight:
            self._refresh_noise(needed=self.schedule.solver == "lcm")
            out = self._step(None, None)
            if out is not None:
                finished.append(out)
        return finished

    def reset(self):
        """Forget the frames in flight."""
        self.state = StreamState.empty(self.n)

    def _step(self, x_new, eps_new):
        state, F = self.state, self.frames
        occupied = tuple(state.occupied)
        if x_new is None and not occupied:
            return None
        rows = self._rows(x_new is not None, occupied)
        x_parts = ([x_new] if x_new is not None else []) + [state.latents[j] for j in occupied]
        x = torch.cat(x_parts) if len(x_parts) > 1 else x_parts[0]

        if self.cfg == "full":
            x_model = torch.cat([x, x])
        elif self.cfg == "initialize" and x_new is not None:
            x_model = torch.cat([x_new, x])
        else:
            x_model = x
        output = self.denoiser(x_model, rows.t_model, rows.cond_model)
        pred, a, b = self.schedule.prediction_type, rows.alpha, rows.beta
        uncond_rows = output.shape[0] - x.shape[0]
        cond_out = output[uncond_rows:]

        residual = None
        if self.cfg == "none":
            x0, eps = to_x0_eps(cond_out, x, a, b, pred)
        elif self.cfg == "full":
            x0, eps = to_x0_eps(full_guidance(output[:uncond_rows], cond_out, self.guidance_scale), x, a, b, pred)
        else:
            x0_c, eps_c = to_x0_eps(cond_out, x, a, b, pred)
            new_residual = eps_new
            if self.cfg == "initialize" and x_new is not None:   # the newest frame's real ε_u
                new_residual = to_x0_eps(output[:F], x_new, a[:F], b[:F], pred)[1]
            res_parts = ([new_residual] if x_new is not None else []) + [state.residuals[j] for j in occupied]
            residual = torch.cat(res_parts) if len(res_parts) > 1 else res_parts[0]
            x0, eps = guided_self(x0_c, eps_c, residual, self.guidance_scale, self.delta, rows.beta_over_alpha)

        if self.schedule.solver == "lcm":
            x0 = consistency_x0(x0, x, rows.c_skip, rows.c_out)
            injected = self.noise.flatten(0, 1)[rows.noise_rows]
        else:
            injected = eps
        x_next = advance(x0, injected, rows.alpha_next, rows.beta_next)
        if residual is not None:
            residual = next_residual(residual, eps, injected, b, rows.c_skip, rows.c_out,
                                     rows.beta_over_alpha, rows.ratio)
        self.calls += 1
        return self._shift(rows.slots, x_next, residual)

    def _shift(self, slots, x_next, residual):
        """Slot i's rows move to slot i+1's place in the buffer; slot n−1's rows leave finished."""
        n, F = self.n, self.frames
        latents, residuals = [None] * (n - 1), [None] * (n - 1)
        x_chunks = x_next.split(F)
        r_chunks = residual.split(F) if residual is not None else [None] * len(slots)
        finished = None
        for slot, xc, rc in zip(slots, x_chunks, r_chunks):
            if slot == n - 1:
                finished = xc
            else:
                latents[slot], residuals[slot] = xc, rc
        self.state = StreamState(latents, residuals)
        return finished
