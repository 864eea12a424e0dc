"""The per-step coefficients of a stream's timesteps, read off a diffusers scheduler.

Every row of a denoiser call is written in one parametrisation, x = α·x0 + β·ε:
- variance-preserving schedulers (DDIM, LCM, DDPM, Euler...): α = √ᾱ(t), β = √(1−ᾱ(t));
  Euler's k-diffusion state x_k = x0 + σ·ε is the same point scaled by α = 1/√(1+σ²), β = σ·α;
- flow-matching schedulers: x = (1−σ)·x0 + σ·ε, so α = 1−σ, β = σ.
Each step i also carries the coefficients of the step its row moves to (α', β'): the next picked
timestep, or the scheduler's end point for the last one — and how the noise β'·n it puts back is
made: n = √(1−γ²)·ε̂ + γ·z with fresh Gaussian z. γ = 0 is the deterministic DDIM / Euler step,
γ = 1 LCM's re-noising, and in between DDIM with η > 0 and TCD's gamma (its step to an earlier
s = ⌊(1−η)·t'⌋ and back up to t', which is exactly such a mix).

DPM-Solver++(2M) is the DDIM step taken from an extrapolated estimate D = a·x̂0 + b·x̂0_prev, the
row's x̂0 of its previous step weighted by the ratio r of the steps' log-SNR gaps (a = 1 + 1/(2r),
b = −1/(2r)); a row's first step, one from pure noise's −∞ log-SNR and the last step where the
scheduler's rules say so are first order (a = 1, b = 0).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields, replace

import torch

from ..checks import check_number

SOLVERS = ("lcm", "ddim", "tcd", "dpmpp2m")


@dataclass(frozen=True)
class StepSchedule:
    """Coefficients of n stream steps, each a tensor of shape [n] (float64 on the CPU)."""

    timesteps: torch.Tensor     # the value the denoiser is given for each step
    alpha: torch.Tensor
    beta: torch.Tensor
    alpha_next: torch.Tensor    # where each step's row goes; the last goes to the schedule's end
    beta_next: torch.Tensor
    c_skip: torch.Tensor        # LCM boundary scalings (c_skip = 0, c_out = 1 for DDIM and TCD)
    c_out: torch.Tensor
    prediction_type: str        # "epsilon", "v_prediction" or "flow"
    solver: str                 # "lcm" (consistency step, re-noised), "ddim" (DDIM / Euler), "tcd" or "dpmpp2m"
    noise_scale: float          # txt2img starts from x = noise_scale·ε, as the scheduler does
    noise_share: torch.Tensor = None   # γ: the share of fresh noise in what each step puts back
    x0_weight: torch.Tensor = None     # DPM-Solver++(2M)'s a and b (None: 1 and 0, every other solver)
    history_weight: torch.Tensor = None
    held_scale: torch.Tensor = None    # the pipeline's latents per the stream's after each step (1/α' for Euler)
    held_scale_in: float = 1.0         # the same before the first step (1/α for Euler)

    def __len__(self) -> int:
        return len(self.timesteps)

    def first(self, k: int) -> "StepSchedule":
        """The first `k` steps alone, the last of them going where it went here (to step k's
        timestep, not the schedule's end): a trajectory stopped part-way (SDXL's denoising_end)."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k must lie in [1, {len(self)}], got {k}")
        return replace(self, **{f.name: getattr(self, f.name)[:k] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def is_flow_scheduler(scheduler) -> bool:
    return getattr(scheduler, "alphas_cumprod", None) is None and "shift" in scheduler.config


# The schedulers whose own step is one of SOLVERS: their pipelines' images are reproduced. Any other
# (UniPC, PNDM, Heun, ancestral samplers, DDPM) gets its timesteps run with the DDIM / Euler step.
_OWN_SOLVERS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "ddim", "FlowMatchEulerDiscreteScheduler": "ddim",
                "LCMScheduler": "lcm", "TCDScheduler": "tcd", "DPMSolverMultistepScheduler": "dpmpp2m"}


def own_solver(scheduler) -> str | None:
    """The solver that is `scheduler`'s own step (its class or a base's), or None. DPM-Solver counts
    in its default form: DPM-Solver++, second order, midpoint, deterministic."""
    name = next((cls.__name__ for cls in type(scheduler).__mro__ if cls.__name__ in _OWN_SOLVERS), None)
    if name == "DPMSolverMultistepScheduler":
        c = scheduler.config
        if (c.algorithm_type, c.solver_order, c.solver_type, c.thresholding) != ("dpmsolver++", 2, "midpoint", False):
            return None
    return _OWN_SOLVERS.get(name)


def default_solver(scheduler) -> str:
    """LCM's consistency step for LCM schedulers, TCD's for TCD, the DDIM / Euler step otherwise (a
    stream's default: the multistep solver is taken only when asked, as it excludes residual guidance)."""
    solver = own_solver(scheduler)
    return solver if solver in ("lcm", "tcd") else "ddim"


def validate_steps(steps, num_inference_steps: int | None) -> list[int]:
    """Indices into the scheduler's `num_inference_steps`-step schedule: ints, increasing, in range
    (None: no upper bound yet, the step count being a later call's)."""
    if isinstance(steps, (int, str, bytes)) or not hasattr(steps, "__iter__"):
        raise ValueError(f"steps must be a list of step indices, got {steps!r}")
    steps = list(steps)
    if not steps:
        raise ValueError("steps must name at least one step index")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in steps):
        raise ValueError(f"steps must be integers, got {steps!r}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"steps must not repeat, got {steps!r}")
    if steps != sorted(steps):
        raise ValueError(f"steps must be increasing (noisiest first), got {steps!r}")
    if steps[0] < 0 and num_inference_steps is None:
        raise ValueError(f"steps must not be negative, got {steps!r}")
    if steps[0] < 0 or (num_inference_steps is not None and steps[-1] >= num_inference_steps):
        raise ValueError(f"steps must lie in [0, {num_inference_steps}) for num_inference_steps={num_inference_steps}, got {steps!r}")
    return steps


def distinct_steps(scheduler, num_inference_steps: int) -> torch.Tensor:
    """Where each timestep first comes in the scheduler's set schedule: multistage schedulers list one
    twice (PNDM's warm-up, Heun's two evaluations), and a step of fastdiff's takes each once."""
    seen, first = set(), []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        if t not in seen:
            seen.add(t)
            first.append(i)
    if len(first) != num_inference_steps:
        raise ValueError(f"{type(scheduler).__name__} gives {len(first)} distinct timesteps for "
                         f"num_inference_steps={num_inference_steps}; fastdiff takes one per step")
    return torch.tensor(first)


def _numbers(values, name: str) -> list[float]:
    """`values` (a list, tuple, array or 1-d tensor) as floats; a ValueError naming `name` else."""
    if isinstance(values, (int, float, str)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of {name}, got {values!r}")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {list(values)!r}") from None


def validate_timesteps(timesteps, num_train_timesteps: int, flow: bool = False) -> list[float]:
    """Explicit timesteps: numbers, strictly decreasing, within the model's training range — whole
    numbers below `num_train_timesteps` indexing its schedule, or for a `flow`-matching model any
    σ·`num_train_timesteps` up to pure noise's (σ = 1)."""
    values = _numbers(timesteps, "timesteps")
    if not all(math.isfinite(t) and (flow or t == int(t)) for t in values):   # they index the training schedule
        raise ValueError(f"timesteps must be whole numbers, got {list(timesteps)!r}")
    if not values:
        raise ValueError("timesteps must name at least one timestep")
    if len(set(values)) != len(values):
        raise ValueError(f"timesteps must not repeat, got {list(timesteps)!r}")
    if values != sorted(values, reverse=True):
        raise ValueError(f"timesteps must be decreasing (noisiest first), got {list(timesteps)!r}")
    if values[-1] < 0 or values[0] > num_train_timesteps or (values[0] == num_train_timesteps and not flow):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}{']' if flow else ')'}, got "
                         f"{list(timesteps)!r}")
    return values


def validate_sigmas(sigmas) -> list[float]:
    """Custom sigmas for a scheduler's ``set_timesteps(sigmas=...)``: finite, non-negative, decreasing."""
    values = _numbers(sigmas, "sigmas")
    if not values:
        raise ValueError("sigmas must name at least one sigma")
    if not all(math.isfinite(s) and s >= 0 for s in values):
        raise ValueError(f"sigmas must be finite and non-negative, got {values!r}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly decreasing (noisiest first), got {values!r}")
    return values


def set_schedule(scheduler, num_inference_steps: int, sigmas=None, mu: float | None = None) -> int:
    """Set `scheduler` to its own schedule of `num_inference_steps`, or to the custom `sigmas` (as
    diffusers' pipelines pass them; how many steps they make is the scheduler's rule: Euler's list
    ends with the terminal σ, flow matching's does not). `mu`: a flow-matching scheduler's shift
    where it shifts by the image's size (Flux's). Returns the number of steps."""
    shift = {} if mu is None else {"mu": mu}
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, **shift)
        return num_inference_steps
    sigmas = validate_sigmas(sigmas)
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"sigmas: {type(scheduler).__name__}.set_timesteps takes no custom sigmas (Euler, "
                         "flow-matching Euler and UniPC do); give timesteps instead")
    scheduler.set_timesteps(sigmas=sigmas, **shift)
    steps = len(set(scheduler.timesteps.tolist()))
    if steps < 1:
        raise ValueError(f"sigmas: {sigmas!r} leave {type(scheduler).__name__} no step to take")
    return steps


def step_schedule(scheduler, steps=None, timesteps=None, num_inference_steps: int = 50,
                  solver: str | None = None, eta: float = 0.0, sigmas=None, mu: float | None = None) -> StepSchedule:
    """Coefficients for the stream's steps: `steps` index the scheduler's own schedule of
    `num_inference_steps` (StreamDiffusion's t_index_list) — or the schedule it makes of custom
    `sigmas`, whose length then sets the step count — or `timesteps` gives them explicitly.
    `mu` shifts a schedule the scheduler shifts by the image's size (see :func:`set_schedule`).

    `eta` is the stochasticity of the "ddim" solver (DDIM's η) and of "tcd" (TCD's gamma), as
    diffusers' pipelines pass it to those schedulers' steps."""
    if (steps is None) == (timesteps is None):
        raise ValueError("give exactly one of steps (indices into the schedule) or timesteps (explicit values)")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    solver = solver or default_solver(scheduler)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    flow = is_flow_scheduler(scheduler)
    if flow and solver != "ddim":
        raise ValueError(f"solver={solver!r} needs a variance-preserving scheduler; flow-matching models use "
                         "'ddim' (flow Euler)")
    eta = check_number(eta, "eta", 0.0, 1.0)
    if eta and (flow or solver in ("lcm", "dpmpp2m")):
        raise ValueError(f"eta applies to the 'ddim' and 'tcd' solvers of variance-preserving schedulers, "
                         f"not solver={solver!r}{' on a flow-matching scheduler' if flow else ''}")
    num_train = scheduler.config.num_train_timesteps
    if sigmas is not None and steps is None:
        raise ValueError("sigmas set the scheduler's schedule: give steps (indices into it) with them, not timesteps")

    if steps is not None:
        if sigmas is None:
            steps = validate_steps(steps, num_inference_steps)
        num_inference_steps = set_schedule(scheduler, num_inference_steps, sigmas, mu)
        steps = validate_steps(steps, num_inference_steps)
        picked = distinct_steps(scheduler, num_inference_steps)[steps]
        t = scheduler.timesteps.double()[picked]
        if flow:
            sigma = scheduler.sigmas.double()[picked]
        elif getattr(scheduler, "sigmas", None) is not None and len(scheduler.sigmas) > len(scheduler.timesteps):
            sigma = scheduler.sigmas.double()[picked]   # schedulers with a σ table (Euler, DPM-Solver): theirs exactly
        else:
            sigma = None
    else:
        t = torch.tensor(validate_timesteps(timesteps, num_train, flow), dtype=torch.float64)
        sigma = t / num_train if flow else None

    if flow:
        alpha, beta = 1 - sigma, sigma
        end = float(scheduler.sigmas[-1]) if steps is not None else 0.0
        alpha_end, beta_end = 1 - end, end
    else:
        if sigma is None:
            abar = scheduler.alphas_cumprod.double()[t.round().long()]
            alpha, beta = abar.sqrt(), (1 - abar).sqrt()
        else:
            alpha = 1 / (1 + sigma**2).sqrt()
            beta = sigma * alpha
        # DDIM ends at its final ᾱ (set_alpha_to_one); LCM returns its denoised estimate; Euler and
        # DPM-Solver end at their σ table's last entry (0, or σ_min); TCD's last step goes to t = 0.
        if solver == "lcm":
            abar_end = 1.0
        elif solver == "tcd":
            abar_end = float(scheduler.alphas_cumprod[0])
        elif sigma is not None:
            abar_end = 1 / (1 + float(scheduler.sigmas[-1]) ** 2)
        else:
            abar_end = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        alpha_end, beta_end = abar_end**0.5, (1 - abar_end) ** 0.5

    alpha_next = torch.cat([alpha[1:], alpha.new_tensor([alpha_end])])
    beta_next = torch.cat([beta[1:], beta.new_tensor([beta_end])])
    noise_share = _noise_share(scheduler, solver, eta, t, alpha, beta, alpha_next, beta_next,
                               euler=not flow and sigma is not None)
    if solver == "lcm":
        scaled = t * scheduler.config.get("timestep_scaling", 10.0)
        sigma_data = 0.5
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    else:
        c_skip, c_out = torch.zeros_like(t), torch.ones_like(t)

    # The pipeline starts from init_noise_sigma·ε. Euler-type schedulers hold k-diffusion's x_k = x0 + σ·ε
    # (init_noise_sigma ≈ σ_max > 1) and feed the model α·x_k; the others (DPM-Solver, UniPC) hold x itself.
    noise_scale, k_state = 1.0, False
    if not flow and sigma is not None:
        init = float(scheduler.init_noise_sigma)
        k_state = init > 1
        noise_scale = init * float(alpha[0]) if k_state else init
    held_scale = 1 / alpha_next if k_state else torch.ones_like(alpha_next)
    prediction_type = "flow" if flow else scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, flow)")
    weights = _multistep_weights(scheduler, alpha, beta, alpha_next, beta_next) if solver == "dpmpp2m" else (None, None)
    return StepSchedule(t, alpha, beta, alpha_next, beta_next, c_skip, c_out, prediction_type, solver, noise_scale,
                        noise_share, *weights, held_scale, 1 / float(alpha[0]) if k_state else 1.0)


def _multistep_weights(scheduler, alpha, beta, alpha_next, beta_next) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M)'s (a, b) per step (see the module's docstring). Step i's row was at step i−1
    the call before; the last step is first order as diffusers' DPM-Solver makes it (with fewer than
    15 steps, ``euler_at_final``, or an end at σ = 0)."""
    log_snr = torch.log(alpha) - torch.log(beta)                  # −∞ at pure noise
    log_snr_next = torch.log(alpha_next) - torch.log(beta_next)   # +∞ at σ = 0
    n = len(alpha)
    a, b = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    config = scheduler.config
    first_order_last = (config.get("euler_at_final", False) or (config.get("lower_order_final", True) and n < 15)
                        or float(beta_next[-1]) == 0)
    for i in range(1, n - 1 if first_order_last else n):
        gap, gap_before = float(log_snr_next[i] - log_snr[i]), float(log_snr[i] - log_snr[i - 1])
        if math.isfinite(gap) and math.isfinite(gap_before) and gap > 0 and gap_before > 0:
            half_inverse_ratio = gap / (2 * gap_before)   # 1/(2r), r = gap_before / gap
            a[i], b[i] = 1 + half_inverse_ratio, -half_inverse_ratio
    return a, b


def _noise_share(scheduler, solver, eta, t, alpha, beta, alpha_next, beta_next, euler: bool) -> torch.Tensor:
    """γ per step (see the module's docstring); the last step puts back no fresh noise but LCM's."""
    gamma = torch.zeros_like(t)
    if solver == "lcm":
        return torch.ones_like(t)
    if not eta or euler:   # Euler's step takes no eta in diffusers either
        return gamma
    last = len(t) - 1
    for i in range(last):
        abar, abar_next = float(alpha[i]) ** 2, float(alpha_next[i]) ** 2
        if solver == "ddim":    # σ = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ')
            sigma = eta * ((1 - abar_next) / (1 - abar)) ** 0.5 * (1 - abar / abar_next) ** 0.5
        else:                   # TCD: back down to s = ⌊(1−η)·t'⌋, then noised up to t'
            abar_s = float(scheduler.alphas_cumprod[int((1 - eta) * float(t[i + 1]))])
            sigma = max(0.0, 1 - abar_next / abar_s) ** 0.5
        gamma[i] = sigma / float(beta_next[i]) if beta_next[i] > 0 else 0.0
    if solver == "ddim" and eta:   # DDIM's last step is noised too, towards its final ᾱ
        abar, abar_next = float(alpha[last]) ** 2, float(alpha_next[last]) ** 2
        if beta_next[last] > 0:
            sigma = eta * ((1 - abar_next) / (1 - abar)) ** 0.5 * (1 - abar / abar_next) ** 0.5
            gamma[last] = sigma / float(beta_next[last])
    return gamma
