"""The stream step: one denoiser call takes every row one step, each from its own timestep.

    x_next, residual_next = stream_step(denoiser, x, rows, residual, guider, noise)

A row is x = α·x0 + β·ε. The guider lays the model's rows out and turns its outputs into the
guided pair (x̂0, ε̂) (:mod:`.guiders`); the solver then moves each row to its next timestep
(:mod:`.solvers`): LCM's consistency estimate re-noised with `noise`, or the deterministic
DDIM / Euler / flow-Euler step. Residual guidance carries each row's residual S along.

DPM-Solver++(2M) carries each row's last x̂0 in the same place as residual guidance's S (the two
don't mix: :func:`carries_state`), and steps from a·x̂0 + b·x̂0_prev.

For fixed per-row coefficients every one of these maps is affine in (x, the model's outputs, S,
noise). :func:`fold` therefore runs the very same functions once on one number per row, reads off
the coefficients of each input, and the step becomes a few fused multiply-adds per call — the
equations stay written once, in the small functions above.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..denoiser import Conditioning
from .guidance import next_residual, safe_ratio
from .guiders import Guider
from .schedule import StepSchedule
from .solvers import advance, consistency_x0, injected_noise

__all__ = ["StepRows", "FoldedStep", "step_rows", "reference_update", "fold", "stream_step", "carries_state"]

_COEFFICIENTS = ("alpha", "beta", "alpha_next", "beta_next", "c_skip", "c_out", "ratio", "beta_over_alpha",
                 "eps_share", "noise_share", "x0_weight", "history_weight")


def carries_state(guider: Guider, solver: str) -> bool:
    """Whether each row carries a tensor from call to call: residual guidance's S, or the multistep
    solver's last x̂0; ValueError for both at once."""
    if guider.carries_residual and solver == "dpmpp2m":
        raise ValueError(f"solver 'dpmpp2m' keeps each row's last estimate where cfg={guider.mode!r} keeps its "
                         "residual; use cfg 'full' or 'none' with it, or another solver")
    return guider.carries_residual or solver == "dpmpp2m"


@dataclass
class StepRows:
    """One call's rows: R rows, the first ``new`` of them frames entering the stream now.

    Coefficients are per-row tensors [R, 1, 1, 1]; ``t_model`` / ``cond_model`` are the model
    call's timesteps and conditioning as the guider lays them out."""

    new: int
    noise_rows: int              # the leading rows that take fresh noise z (every row that needs it)
    alpha: torch.Tensor
    beta: torch.Tensor
    alpha_next: torch.Tensor
    beta_next: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    ratio: torch.Tensor            # α'/β' (0 for rows leaving the stream)
    beta_over_alpha: torch.Tensor  # β/α (0 for flow rows at σ = 1)
    eps_share: torch.Tensor        # √(1−γ²) and γ: how the noise put back is made (see .schedule)
    noise_share: torch.Tensor
    x0_weight: torch.Tensor        # the multistep solver's a and b (1 and 0 for the others)
    history_weight: torch.Tensor
    prediction_type: str
    solver: str
    t_model: torch.Tensor = None
    cond_model: Conditioning = None
    folded: "FoldedStep | None" = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.alpha.shape[0]


def _pad_rows(noise: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Noise for the leading rows, zeros for the rest (rows that take no fresh noise)."""
    if noise is None:
        return torch.zeros_like(like)
    if noise.shape[0] == like.shape[0]:
        return noise
    return torch.cat([noise, like.new_zeros((like.shape[0] - noise.shape[0],) + like.shape[1:])])


def reference_update(guider: Guider, rows: StepRows, x, out_c, out_u, residual, noise):
    """(x', S') of every row from the model's outputs, straight from the equations.

    `noise` holds the fresh noise z of the first ``rows.noise_rows`` rows (None when no row takes any)."""
    multistep = rows.solver == "dpmpp2m"   # `residual` then holds each row's last x̂0, not a guider's S
    x0, eps, guider_residual = guider.combine(out_c, out_u, x, None if multistep else residual, rows)
    x0 = consistency_x0(x0, x, rows.c_skip, rows.c_out)   # LCM's; c_skip = 0, c_out = 1 leave x̂0 as it is
    state = None
    if multistep:   # step from the extrapolated estimate; this one is the next step's history
        x0, state = rows.x0_weight * x0 + rows.history_weight * residual, x0
        eps = (x - rows.alpha * x0) / rows.beta
    injected = injected_noise(eps, _pad_rows(noise, x), rows.eps_share, rows.noise_share)
    x_next = advance(x0, injected, rows.alpha_next, rows.beta_next)
    if guider_residual is not None:
        state = next_residual(guider_residual, eps, injected, rows.beta, rows.c_skip, rows.c_out,
                              rows.beta_over_alpha, rows.ratio)
    return x_next, state


@dataclass
class FoldedStep:
    """x' = Σ a_k·input_k and S' = Σ b_k·input_k over the inputs (x, out_c, out_u, residual,
    noise); each term is (input name, coefficients [R, 1, 1, 1]). An input with fewer rows than R
    (``initialize``'s unconditional rows, the noise of the rows that take some) covers the first rows."""

    x_terms: list
    residual_terms: list | None
    # A stream's fixed noise is the same tensor call after call: from its second call on, its term,
    # padded to every row, is kept per output (x or residual) and starts the sum — one op fewer and no
    # slice a call. Fresh noise, a new tensor every call, is only remembered, never computed twice.
    _noise_seen: dict = field(default_factory=dict, repr=False)   # output -> (noise, kept: None before its 2nd call, False if none)

    def _apply(self, output: str, terms, inputs, out=None) -> torch.Tensor:
        (name, coef), rest = terms[0], terms[1:]
        kept = self._kept_noise(output, terms, inputs.get("noise"), inputs[name])
        if kept is not None:
            term, rest = kept
            out = torch.addcmul(term, coef, inputs[name], out=out)
        else:
            out = torch.mul(coef, inputs[name], out=out)
        for name, coef in rest:
            value = inputs[name]
            k = value.shape[0]
            if k == out.shape[0]:
                out.addcmul_(coef, value)
            else:   # fold() cut the coefficients to the input's rows
                out[:k].addcmul_(coef, value)
        return out

    def _kept_noise(self, output: str, terms, noise, like: torch.Tensor):
        """(the noise's term padded to every row, the terms after the first but the noise's) when
        `noise` is the tensor this output's last call had too; else None."""
        if noise is None:
            return None
        seen = self._noise_seen.get(output)
        if seen is None or seen[0] is not noise:
            self._noise_seen[output] = (noise, None)
            return None
        if seen[1] is None:
            coefs = [c for name, c in terms[1:] if name == "noise"]
            kept = False   # no noise term after the first: nothing to keep
            if coefs:
                term = torch.zeros_like(like)
                term[: noise.shape[0]] = coefs[0] * noise
                kept = (term, [t for t in terms[1:] if t[0] != "noise"])
            self._noise_seen[output] = seen = (noise, kept)
        return seen[1] or None

    def __call__(self, out=None, residual_out=None, **inputs):
        """(x', S'), written into `out` / `residual_out` where given (no input may share their memory)."""
        x_next = self._apply("x", self.x_terms, inputs, out)
        residual = (self._apply("residual", self.residual_terms, inputs, residual_out)
                    if self.residual_terms is not None else None)
        return x_next, residual


def fold(guider: Guider, rows: StepRows) -> FoldedStep | None:
    """The step of `rows` under `guider` as per-row affine coefficients, found by running
    :func:`reference_update` on one float64 number per row; None when the step is not affine
    (guidance rescale) or a coefficient is not finite (ε-prediction at α = 0)."""
    if not guider.affine:
        return None
    R, new = len(rows), rows.new
    scalar = replace(rows, **{k: getattr(rows, k).detach().to("cpu", torch.float64) for k in _COEFFICIENTS})
    sizes = {"x": R, "out_c": R}
    if guider.uncond_rows(R, new):
        sizes["out_u"] = guider.uncond_rows(R, new)
    carried = carries_state(guider, rows.solver)
    if carried:
        sizes["residual"] = R
    if rows.noise_rows:
        sizes["noise"] = rows.noise_rows

    def run(probe: str | None):
        inputs = {k: torch.full((n, 1, 1, 1), float(k == probe), dtype=torch.float64) for k, n in sizes.items()}
        return reference_update(guider, scalar, inputs["x"], inputs["out_c"], inputs.get("out_u"),
                                inputs.get("residual"), inputs.get("noise"))

    base_x, base_s = run(None)
    if base_x.abs().max() > 0 or (base_s is not None and base_s.abs().max() > 0):
        raise AssertionError("the stream step has a constant term; it must be linear in its inputs")
    device, dtype = rows.alpha.device, rows.alpha.dtype
    x_terms, s_terms = [], []
    for name, n in sizes.items():
        dx, ds = run(name)
        for terms, coef in ((x_terms, dx), (s_terms, ds)):
            if coef is None:
                continue
            coef = coef[:n]
            if not torch.isfinite(coef).all():
                return None
            if coef.abs().max() > 0:
                terms.append((name, coef.to(device, dtype)))
    # the first term allocates the output, so it must cover every row
    for terms in (x_terms, s_terms):
        terms.sort(key=lambda term: term[1].shape[0] < R)
        if terms and terms[0][1].shape[0] < R:
            terms.insert(0, ("x", torch.zeros((R, 1, 1, 1), device=device, dtype=dtype)))
    if not x_terms:
        x_terms = [("x", torch.zeros((R, 1, 1, 1), device=device, dtype=dtype))]
    if carried and not s_terms:
        s_terms = [("x", torch.zeros((R, 1, 1, 1), device=device, dtype=dtype))]
    return FoldedStep(x_terms, s_terms if carried else None)


def step_rows(schedule: StepSchedule, steps: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
              new: int, guider: Guider, device, dtype, folded: bool = True) -> StepRows:
    """The rows of one call: row r is at step ``steps[r]`` of `schedule` (the first `new` rows
    just entered); `cond` / `uncond` hold one row of conditioning per row."""
    def per_row(values):
        return values[steps].to(device, dtype).view(-1, 1, 1, 1)

    s = schedule
    carries_state(guider, s.solver)   # refused here, before any call, where they can't go together
    gamma = s.noise_share if s.noise_share is not None else torch.zeros_like(s.alpha)
    a = s.x0_weight if s.x0_weight is not None else torch.ones_like(s.alpha)
    b = s.history_weight if s.history_weight is not None else torch.zeros_like(s.alpha)
    # a row takes fresh noise where it has a share and the step puts any noise back
    takes_noise = ((gamma * s.beta_next) > 0)[steps]
    noise_rows = int(takes_noise.nonzero().max()) + 1 if bool(takes_noise.any()) else 0
    rows = StepRows(
        new=new, noise_rows=noise_rows,
        alpha=per_row(s.alpha), beta=per_row(s.beta), alpha_next=per_row(s.alpha_next),
        beta_next=per_row(s.beta_next), c_skip=per_row(s.c_skip), c_out=per_row(s.c_out),
        ratio=per_row(safe_ratio(s.alpha_next, s.beta_next)), beta_over_alpha=per_row(safe_ratio(s.beta, s.alpha)),
        eps_share=per_row((1 - gamma**2).clamp_min(0).sqrt()), noise_share=per_row(gamma),
        x0_weight=per_row(a), history_weight=per_row(b),
        prediction_type=s.prediction_type, solver=s.solver)
    t = s.timesteps[steps].to(device, torch.float32)
    rows.t_model, rows.cond_model = guider.model_conditioning(t, cond, uncond, new)
    rows.folded = fold(guider, rows) if folded else None
    return rows


def stream_step(denoiser, x: torch.Tensor, rows: StepRows, residual: torch.Tensor | None, guider: Guider,
                noise: torch.Tensor | None, cond: Conditioning | None = None, out: torch.Tensor | None = None,
                residual_out: torch.Tensor | None = None):
    """One denoiser call over `rows`: (x', S'), each row one step on (S' None without residual
    guidance). `noise` holds the fresh noise z of the first ``rows.noise_rows`` rows; `cond`, when
    given, stands in for ``rows.cond_model`` (a compiled step takes the prompt as an input). With
    `out` (and `residual_out`), x' (and S') are written there: memory no input shares."""
    output = denoiser(guider.model_latents(x, rows.new), rows.t_model, rows.cond_model if cond is None else cond)
    out_c, out_u = guider.split(output, rows.new)
    if rows.folded is not None:
        return rows.folded(x=x, out_c=out_c, out_u=out_u, residual=residual, noise=noise, out=out,
                           residual_out=residual_out)
    x_next, residual = reference_update(guider, rows, x, out_c, out_u, residual, noise)
    if out is not None:
        x_next = out.copy_(x_next)
    if residual_out is not None and residual is not None:
        residual = residual_out.copy_(residual)
    return x_next, residual
