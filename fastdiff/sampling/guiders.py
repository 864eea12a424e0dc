"""One small guider object per classifier-free-guidance mode.

A guider says three things about a denoiser call over R rows, of which the first ``new`` are frames
that just entered the stream:

- :meth:`Guider.model_latents` / :meth:`Guider.model_conditioning` — the rows the model runs: the R
  conditional rows, after any unconditional rows the mode needs (R more for ``full``, ``new`` more
  for ``initialize``, none for ``none`` and ``self``);
- :meth:`Guider.split` — the model's output back into (conditional, unconditional) parts;
- :meth:`Guider.combine` — those parts into the guided pair (x̂0, ε̂) and the residual noise S the
  row carries (``self`` / ``initialize`` only), from the equations in :mod:`.guidance`.

Every method works row-wise on per-row coefficients, so a guider also runs on one number per row:
that is how :mod:`.step` folds a whole step into a few multiply-adds.
"""

from __future__ import annotations

import torch

from ..checks import check_number
from ..denoiser import Conditioning   # the protocol's row container (no model code)
from .guidance import CFG_MODES, check_mode, full_guidance, guided_self
from .solvers import to_x0_eps

__all__ = ["Guider", "NoGuidance", "FullGuidance", "SelfGuidance", "InitializeGuidance", "make_guider"]


class Guider:
    """No guidance: ε̂ = ε_c, one model row per row."""

    mode = "none"
    carries_residual = False   # whether rows carry a residual S from step to step
    needs_uncond = False       # whether the model also sees the unconditional prompt
    affine = True              # whether (x̂0, ε̂, S) are affine in (x, outputs, S) for fixed coefficients

    def __init__(self, scale: float = 1.0, delta: float = 1.0, rescale: float = 0.0):
        self.scale = check_number(scale, "guidance_scale", 0.0)
        self.delta = check_number(delta, "delta", 0.0)
        self.rescale = check_number(rescale, "guidance_rescale", 0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, delta={self.delta}, rescale={self.rescale})"

    def uncond_rows(self, rows: int, new: int) -> int:
        """How many unconditional rows come before the `rows` conditional ones."""
        return 0

    def model_rows(self, rows: int, new: int) -> int:
        return self.uncond_rows(rows, new) + rows

    def model_latents(self, x: torch.Tensor, new: int) -> torch.Tensor:
        """The latents of the model call: unconditional rows first."""
        return x

    def model_conditioning(self, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None, new: int):
        """(timesteps, conditioning) of the model call, laid out as :meth:`model_latents`."""
        return t, cond

    def split(self, output: torch.Tensor, new: int):
        """(conditional outputs [R], unconditional outputs or None) from the model's output."""
        extra = self._extra_of(output, new)
        if not extra:   # no slicing: each op between the model calls costs a frame ~10 µs
            return output, None
        return output[extra:], output[:extra]

    def _extra_of(self, output: torch.Tensor, new: int) -> int:
        return 0

    def combine(self, out_c, out_u, x, residual, c):
        """(x̂0, ε̂, S) of each row; `c` holds its per-row coefficients (a :class:`~.step.StepRows`)."""
        x0, eps = to_x0_eps(out_c, x, c.alpha, c.beta, c.prediction_type)
        return x0, eps, None


NoGuidance = Guider


class FullGuidance(Guider):
    """o = o_u + g·(o_c − o_u) on the raw outputs, with a real unconditional row for every row;
    ``rescale`` φ > 0 pulls the guided output's spread back towards the conditional one's
    (diffusers' ``guidance_rescale``)."""

    mode = "full"
    needs_uncond = True

    @property
    def affine(self) -> bool:
        return self.rescale == 0   # the rescale divides by a per-picture standard deviation

    def uncond_rows(self, rows, new):
        return rows

    def model_latents(self, x, new):
        return torch.cat([x, x])

    def model_conditioning(self, t, cond, uncond, new):
        return torch.cat([t, t]), Conditioning.cat([uncond, cond])

    def _extra_of(self, output, new):
        return output.shape[0] // 2

    def combine(self, out_c, out_u, x, residual, c):
        guided = full_guidance(out_u, out_c, self.scale, self.rescale)
        x0, eps = to_x0_eps(guided, x, c.alpha, c.beta, c.prediction_type)
        return x0, eps, None


class SelfGuidance(Guider):
    """Residual guidance: ε = δ·S + g·(ε_c − δ·S), the stored residual S standing in for ε_u."""

    mode = "self"
    carries_residual = True
    needs_uncond = False

    def combine(self, out_c, out_u, x, residual, c):
        x0_c, eps_c = to_x0_eps(out_c, x, c.alpha, c.beta, c.prediction_type)
        x0, eps = guided_self(x0_c, eps_c, residual, self.scale, self.delta, c.beta_over_alpha)
        return x0, eps, residual


class InitializeGuidance(SelfGuidance):
    """As ``self``, but each new frame gets one real unconditional row, whose ε_u becomes its S."""

    mode = "initialize"
    needs_uncond = True

    def uncond_rows(self, rows, new):
        return new

    def model_latents(self, x, new):
        return torch.cat([x[:new], x]) if new else x

    def model_conditioning(self, t, cond, uncond, new):
        if not new:
            return t, cond
        return torch.cat([t[:new], t]), Conditioning.cat([uncond.rows(new), cond])

    def _extra_of(self, output, new):
        return new

    def combine(self, out_c, out_u, x, residual, c):
        if out_u is not None:
            k = out_u.shape[0]
            eps_u = to_x0_eps(out_u, x[:k], c.alpha[:k], c.beta[:k], c.prediction_type)[1]
            residual = torch.cat([eps_u, residual[k:]])
        return super().combine(out_c, out_u, x, residual, c)


_GUIDERS = {g.mode: g for g in (NoGuidance, FullGuidance, SelfGuidance, InitializeGuidance)}
assert tuple(_GUIDERS) == CFG_MODES


def make_guider(cfg: str, guidance_scale: float = 1.0, delta: float = 1.0, guidance_rescale: float = 0.0) -> Guider:
    """The guider of CFG mode `cfg` (one of :data:`~.guidance.CFG_MODES`)."""
    guider = _GUIDERS[check_mode(cfg)](guidance_scale, delta, guidance_rescale)
    if guider.rescale > 0 and cfg != "full":
        raise ValueError(f"guidance_rescale applies to cfg='full' only, not cfg={cfg!r}")
    return guider
