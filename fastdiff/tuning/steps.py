"""Timestep search: the few timesteps that lose least against a many-step teacher.

    sched = search_steps(pipe, prompts, steps=4, method="evolution", budget_minutes=10)
    sched.save("shapes-4.json")

Methods, each a small function over a shared :class:`~.fitness.Trajectories`:

- :func:`dp_search` — dynamic programming over a fine teacher trajectory (BOSS / GITS): the cost of
  a jump i→j is the error of the solver's step from node i straight to node j against the
  trajectory at j; the least-cost K-jump path is the schedule. One model call per node, seconds.
- :func:`evolution_search` — AutoDiffusion's evolutionary search over sorted, distinct timestep
  sets: a population seeded with the uniform schedule (and DP's, when given), the best `top_k`
  kept each generation, mutants and crossovers filling the rest; seeded and resumable.
- :func:`ays_schedule` — Align Your Steps' published schedules (diffusers' ``AysSchedules``) for the
  model families they were made for, log-linearly interpolated to `steps`.

The first timestep is fixed: a whole trajectory (``mode="pipeline"``) starts where the scheduler's
own schedule starts (pure noise must enter at the timestep that holds it), and a stream
(``mode="stream"``) enters at img2img's strength; the others are searched.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from ..artefacts import StaleArtefactError, read_json, write_json
from ..checks import check_choice, check_int, check_number
from ..denoiser import check_prompts
from ..sampling.schedule import step_schedule
from ..sampling.solvers import advance
from .fitness import DEFAULT_WEIGHTS, Trajectories
from .schedules import Schedule, prompts_hash, schedule_fields

__all__ = ["METHODS", "search_steps", "dp_search", "evolution_search", "ays_schedule", "uniform_timesteps",
           "least_cost_path", "mutate", "crossover", "is_valid"]

METHODS = ("evolution", "dp", "ays", "uniform")
# AutoDiffusion's published defaults (../shared/REFERENCES.md)
EVOLUTION = dict(population=50, top_k=10, mutants=25, crossovers=15, mutation_probability=0.2, generations=10)


# -- candidates ------------------------------------------------------------------------------------
def is_valid(candidate, first: int, low: int = 0) -> bool:
    """Strictly decreasing integers starting at `first`, all in [low, first]."""
    c = list(candidate)
    return (bool(c) and c[0] == first and all(a > b for a, b in zip(c, c[1:])) and c[-1] >= low
            and all(isinstance(t, int) for t in c))


def uniform_timesteps(first: int, steps: int, end: int = 0) -> list[int]:
    """`steps` timesteps from `first` down, evenly spaced towards `end` ("trailing" spacing)."""
    return [int(round(t)) for t in np.linspace(first, end, steps, endpoint=False)]


def _repair(values, first: int, steps: int, rng: np.random.Generator) -> list[int] | None:
    """Sorted, distinct, `steps` long with `first` first, or None when it cannot be made so."""
    rest = sorted({int(v) for v in values if 0 <= int(v) < first}, reverse=True)
    while len(rest) < steps - 1 and first > len(rest):
        rest = sorted(set(rest) | {int(rng.integers(0, first))}, reverse=True)
    if len(rest) < steps - 1:
        return None
    keep = sorted(rng.choice(len(rest), steps - 1, replace=False)) if len(rest) > steps - 1 else range(len(rest))
    return [first] + [rest[i] for i in keep]


def mutate(candidate: list[int], rng: np.random.Generator, probability: float) -> list[int]:
    """Each timestep but the first moved, with `probability`, to a random one (kept valid)."""
    first, steps = candidate[0], len(candidate)
    values = [int(rng.integers(0, first)) if rng.random() < probability else t for t in candidate[1:]]
    return _repair(values, first, steps, rng) or list(candidate)


def crossover(a: list[int], b: list[int], rng: np.random.Generator) -> list[int]:
    """Each position from one parent or the other (kept valid)."""
    values = [x if rng.random() < 0.5 else y for x, y in zip(a[1:], b[1:])]
    return _repair(values, a[0], len(a), rng) or list(a)


# -- dynamic programming ---------------------------------------------------------------------------
def least_cost_path(cost: np.ndarray, jumps: int) -> tuple[list[int], float]:
    """The path 0 = n_0 < n_1 < … < n_K = N of `jumps` K jumps with the least Σ cost[n_k, n_k+1]
    over an upper-triangular [N+1, N+1] cost matrix; (nodes, total cost)."""
    n = cost.shape[0] - 1
    check_int(jumps, "jumps", 1, n)
    best = np.full((jumps + 1, n + 1), np.inf)
    back = np.zeros((jumps + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, jumps + 1):
        for j in range(k, n + 1):
            options = best[k - 1, :j] + cost[:j, j]
            back[k, j] = int(np.argmin(options))
            best[k, j] = options[back[k, j]]
    nodes = [n]
    for k in range(jumps, 0, -1):
        nodes.append(back[k, nodes[-1]])
    return nodes[::-1], float(best[jumps, n])


@torch.inference_mode()
def dp_search(trajectories: Trajectories, steps: int, fine_steps: int = 100) -> tuple[list[int], dict]:
    """BOSS / GITS: a `fine_steps`-step uniform DDIM trajectory of the search prompts, the cost of
    every jump i→j (the DDIM step from node i straight to node j against node j), and the least-cost
    `steps`-jump path. (timesteps, details)."""
    t = trajectories
    if t.setting.solver != "ddim":
        raise ValueError("method='dp' follows a deterministic trajectory: it needs solver='ddim' "
                         "(use method='evolution' for the stream's LCM step)")
    first = first_timestep(t)
    grid = uniform_timesteps(first, fine_steps, 0)
    schedule = step_schedule(t.pipe.scheduler, timesteps=[float(v) for v in grid], solver="ddim")
    denoiser, guider = t.parts.denoiser, t.teacher_guider
    cond, uncond = t.cond
    alpha = [float(a) for a in schedule.alpha] + [float(schedule.alpha_next[-1])]
    beta = [float(b) for b in schedule.beta] + [float(schedule.beta_next[-1])]
    rows = min(len(t.prompts), t.batch)
    x = t.noise[:rows].to(denoiser.device, denoiser.dtype) * schedule.noise_scale
    if t.clean is not None:
        x = alpha[0] * t.clean[:rows].to(denoiser.device, denoiser.dtype) + beta[0] * x
    c, u = cond.rows(rows), uncond.rows(rows)
    nodes, estimates = [x.float()], []
    for i, step_t in enumerate(grid):
        tt = torch.full((rows,), float(step_t), device=denoiser.device)
        x_model, t_model, c_model = guider.model_latents(x, 0), *guider.model_conditioning(tt, c, u, 0)
        out_c, out_u = guider.split(denoiser(x_model, t_model, c_model), 0)
        coefficients = _Coefficients(alpha[i], beta[i], schedule.prediction_type, x.dtype)
        x0, eps, _ = guider.combine(out_c, out_u, x, None, coefficients)
        estimates.append((x0.float(), eps.float()))
        x = advance(x0, eps, alpha[i + 1], beta[i + 1])
        nodes.append(x.float())
    n = fine_steps
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        x0, eps = estimates[i]
        for j in range(i + 1, n + 1):
            jump = advance(x0, eps, alpha[j], beta[j])
            cost[i, j] = float(((jump - nodes[j]) ** 2).mean())
    path, total = least_cost_path(cost, steps)
    timesteps = [grid[k] for k in path[:-1]]
    return timesteps, {"fine_steps": fine_steps, "path_cost": total, "nodes": [int(k) for k in path]}


class _Coefficients:
    """One step's α, β for every row, where the guiders expect a call's per-row coefficients."""

    def __init__(self, alpha: float, beta: float, prediction_type: str, dtype):
        self.alpha, self.beta = torch.tensor(alpha, dtype=dtype), torch.tensor(beta, dtype=dtype)
        self.beta_over_alpha = torch.tensor(beta / alpha if alpha > 0 else 0.0, dtype=dtype)
        self.prediction_type = prediction_type


# -- evolution -------------------------------------------------------------------------------------
def evolution_search(trajectories: Trajectories, steps: int, budget_minutes: float = 10.0, seed: int = 0,
                     seeds: list[list[int]] = (), weights: dict = DEFAULT_WEIGHTS, state_path: str | None = None,
                     progress=None, **settings) -> tuple[list[int], dict]:
    """AutoDiffusion's search (defaults :data:`EVOLUTION`, overridable by `settings`); resumes from
    `state_path` when it holds a state of the same search. (best timesteps, details)."""
    cfg = {**EVOLUTION, **settings}
    first = first_timestep(trajectories)
    if steps == 1 or first < steps:
        timesteps = [first] if steps == 1 else uniform_timesteps(first, steps)
        return timesteps, {"generations": 0, "evaluations": 0, "note": "nothing to search"}
    rng = np.random.default_rng(seed)
    scores: dict[tuple, float] = {}
    state = _load_state(state_path, trajectories, steps, seed)
    if state is not None:
        scores = {tuple(c): f for c, f in state["scores"]}
        rng.bit_generator.state = state["rng"]
        population = [list(c) for c in state["population"]]
        generation, history = state["generation"], state["history"]
    else:
        population = [uniform_timesteps(first, steps)] + [list(s) for s in seeds if is_valid(s, first)]
        # there are only so many sets of timesteps under an early first one (a late stream's)
        while len(population) < min(cfg["population"], math.comb(first, steps - 1)):
            candidate = _repair(rng.integers(0, first, steps - 1), first, steps, rng)
            if candidate is not None and candidate not in population:
                population.append(candidate)
        generation, history = 0, []
    deadline = time.time() + budget_minutes * 60

    def evaluate(candidates):
        for c in candidates:
            if tuple(c) not in scores and time.time() < deadline:
                scores[tuple(c)] = trajectories.score(c, weights)[0]
        return [c for c in candidates if tuple(c) in scores]

    population = evaluate(population)
    while generation < cfg["generations"] and time.time() < deadline:
        parents = sorted(population, key=lambda c: scores[tuple(c)])[:cfg["top_k"]]
        children = []
        for _ in range(cfg["mutants"]):
            children.append(mutate(parents[int(rng.integers(len(parents)))], rng, cfg["mutation_probability"]))
        for _ in range(cfg["crossovers"]):
            a, b = rng.choice(len(parents), 2, replace=len(parents) < 2)
            children.append(crossover(parents[a], parents[b], rng))
        population = parents + [c for c in evaluate(children) if c not in parents]
        generation += 1
        best = min(population, key=lambda c: scores[tuple(c)])
        history.append({"generation": generation, "best": best, "fitness": scores[tuple(best)],
                        "evaluations": len(scores)})
        if progress is not None:
            progress(history[-1])
        if state_path:
            write_json(state_path, {"key": _state_key(trajectories, steps, seed), "generation": generation,
                                    "population": population, "history": history, "rng": rng.bit_generator.state,
                                    "scores": [[list(c), f] for c, f in scores.items()]})
    best = min(scores, key=scores.get)
    return list(best), {"generations": generation, "evaluations": len(scores), "history": history,
                        "settings": cfg, "complete": generation >= cfg["generations"]}


def _state_key(trajectories: Trajectories, steps: int, seed: int) -> str:
    return f"{prompts_hash(trajectories.prompts)}-{steps}-{seed}-{trajectories.mode}-{trajectories.setting}"


def _load_state(path, trajectories, steps, seed):
    """The saved state at `path` of this very search, None if there is none yet; a file holding
    anything else is refused, not overwritten."""
    if not path or not os.path.isfile(path):
        return None
    try:
        state = read_json(path)
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("key") != _state_key(trajectories, steps, seed):
        raise StaleArtefactError(f"resume: {path} is not the saved state of this search (another model, prompts, "
                                 "steps, seed or settings, or not a state file); give a new path or delete it")
    return state


def _check_evolution(method: str, settings: dict) -> None:
    """The evolutionary search's settings (:data:`EVOLUTION`): known, and only for that method."""
    unknown = sorted(set(settings) - set(EVOLUTION))
    if unknown:
        raise TypeError(f"search_steps got unknown arguments {unknown}; the evolution's settings are "
                        f"{sorted(EVOLUTION)}")
    if settings and method != "evolution":
        raise ValueError(f"{sorted(settings)[0]} is a setting of method='evolution', not of {method!r}")
    for name, value in settings.items():
        if name == "mutation_probability":
            check_number(value, name, 0.0, 1.0)
        else:
            check_int(value, name, 0 if name in ("mutants", "crossovers") else 1)


# -- published schedules -----------------------------------------------------------------------------
AYS_FAMILIES = {"unet": "StableDiffusionTimesteps", "sdxl": "StableDiffusionXLTimesteps"}


def ays_schedule(pipe, steps: int) -> list[int]:
    """Align Your Steps' timesteps for `pipe`'s family (SD 1.x/2.x UNets, SDXL), `steps` of them
    (the published 10, log-linearly interpolated in σ to other counts, as the AYS paper does)."""
    from diffusers.schedulers import AysSchedules

    from ..denoiser import denoiser_for

    family = denoiser_for(pipe).family
    if family not in AYS_FAMILIES:
        raise ValueError(f"method='ays': Align Your Steps publishes schedules for SD 1.x/2.x and SDXL UNets, not "
                         f"for the {family!r} family; use method='evolution' or 'dp'")
    published = AysSchedules[AYS_FAMILIES[family]]
    if steps == len(published):
        return list(published)
    abar = pipe.scheduler.alphas_cumprod.double()
    sigma_of = ((1 - abar) / abar.clamp_min(1e-12)).sqrt()
    sigmas = np.log(sigma_of[published].numpy().clip(1e-6, 1e6))
    xs = np.linspace(0, 1, len(published))
    wanted = np.exp(np.interp(np.linspace(0, 1, steps), xs, sigmas))
    table = np.log(sigma_of.numpy().clip(1e-6, 1e6))
    timesteps = [int(np.argmin(np.abs(table - np.log(s)))) for s in wanted]
    out = []
    for t in timesteps:   # keep them distinct and decreasing
        out.append(min(t, out[-1] - 1) if out else t)
    return out


# -- the front ---------------------------------------------------------------------------------------
def first_timestep(trajectories: Trajectories) -> int:
    """Where every candidate starts: the strength (stream) or the scheduler's own first timestep."""
    if trajectories.mode == "stream":
        return int(round(float(trajectories.strength_timestep)))
    trajectories.parts.set_own_schedule(trajectories.setting.teacher_steps, trajectories.height, trajectories.width)
    return int(trajectories.pipe.scheduler.timesteps[0])


def search_steps(pipe, prompts, steps: int, method: str = "evolution", budget_minutes: float = 10.0, *,
                 mode: str = "pipeline", cfg: str | None = None, guidance_scale: float | None = None,
                 guidance_rescale: float = 0.0, solver: str | None = None, eval_prompts=None, teacher_steps: int = 50,
                 weights: dict | None = None, judge=None, seed: int = 0, frames=None, strength_timestep=None,
                 fine_steps: int = 100, resume: str | None = None, progress=None, **evolution) -> Schedule:
    """Search `steps` timesteps for `pipe` on `prompts` (disjoint from `eval_prompts`, on which the
    result is measured too); returns a :class:`~.schedules.Schedule` with its fitness on both.

    `judge` (``prompts -> (images -> metrics)``, e.g. :func:`~.fitness.shapes_judge`) adds prompt
    accuracy, the Fréchet distance and (for prompts given several times) coverage to the fitness;
    `weights` weighs the terms (:data:`~.fitness.DEFAULT_WEIGHTS`); pipeline mode only. ``mode="stream"`` searches the stream's LCM step on
    `frames` (a clip) entering at `strength_timestep`."""
    check_int(steps, "steps", 1, 64)
    check_choice(method, "method", METHODS)
    check_number(budget_minutes, "budget_minutes", 0.0, low_open=True)
    check_choice(mode, "mode", ("pipeline", "stream"))
    if judge is not None and mode == "stream":
        raise ValueError("judge: a stream search is judged against its teacher only (a clip's frames are not "
                         "pictures of the prompt); pass judge=None")
    prompts = check_prompts(prompts, "prompts", (), allow_empty=False)
    eval_prompts = check_prompts(eval_prompts, "eval_prompts", (), allow_empty=False) if eval_prompts else []
    if set(prompts) & set(eval_prompts):
        raise ValueError("eval_prompts must be disjoint from prompts (the search's own)")
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"weights has unknown terms {unknown}; the terms are {sorted(DEFAULT_WEIGHTS)}")
    for term, weight in weights.items():
        check_number(weight, f"weights['{term}']", 0.0)
    _check_evolution(method, evolution)
    check_int(teacher_steps, "teacher_steps", max(steps, 2))
    check_int(fine_steps, "fine_steps", max(steps, 2))
    check_int(seed, "seed")
    check_number(guidance_scale, "guidance_scale", 0.0, optional=True)
    check_number(guidance_rescale, "guidance_rescale", 0.0, 1.0)
    if strength_timestep is not None and (check_number(strength_timestep, "strength_timestep", 0.0, low_open=True)
                                          != int(strength_timestep)):
        raise ValueError(f"strength_timestep must be a whole timestep, got {strength_timestep!r}")
    if frames is not None and not len(frames):
        raise ValueError("frames: give the clip's frames, at least one")
    if resume is not None and (not isinstance(resume, (str, os.PathLike)) or os.path.isdir(resume)
                               or not os.path.isdir(os.path.dirname(os.path.abspath(resume)))):
        raise ValueError(f"resume must be a file path in an existing folder, got {resume!r}")
    if guidance_scale is None:
        guidance_scale = 1.2 if mode == "stream" else 5.0
    common = dict(mode=mode, cfg=cfg if cfg is not None else ("self" if mode == "stream" else None),
                  guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, solver=solver,
                  teacher_steps=teacher_steps, seed=seed, frames=frames, strength_timestep=strength_timestep)
    start = time.perf_counter()
    search = Trajectories(pipe, prompts, judge=judge(prompts) if judge else None, **common)
    details = {"method": method, "prompts": prompts_hash(prompts), "search_prompts": len(prompts),
               "teacher_steps": teacher_steps, "weights": weights, "guidance_scale": guidance_scale,
               "guidance_rescale": guidance_rescale, "cfg": search.setting.cfg, "seed": seed}
    if method == "uniform":
        timesteps = uniform_timesteps(first_timestep(search), steps)
    elif method == "ays":
        timesteps = ays_schedule(pipe, steps)
    elif method == "dp":
        timesteps, found = dp_search(search, steps, fine_steps)
        details.update(found)
    else:
        seeds = []
        if search.setting.solver == "ddim" and steps > 1:
            seeds.append(dp_search(search, steps, fine_steps)[0])
        timesteps, found = evolution_search(search, steps, budget_minutes, seed, seeds, weights, resume, progress,
                                            **evolution)
        details.update(found)
    fitness = {"search": dict(zip(("fitness", "metrics"), search.score(timesteps, weights))),
               "teacher": search.teacher_metrics}
    if eval_prompts:
        held = Trajectories(pipe, eval_prompts, judge=judge(eval_prompts) if judge else None, **common)
        fitness["eval"] = dict(zip(("fitness", "metrics"), held.score(timesteps, weights)))
        fitness["eval_teacher"] = held.teacher_metrics
        details["eval_prompts"] = prompts_hash(eval_prompts)
    details["seconds"] = round(time.perf_counter() - start, 1)
    details["evaluations"] = search.evaluations
    return Schedule(timesteps, search.setting.solver, mode, method, schedule_fields(pipe),
                    _finite(fitness), details)


def _finite(value):
    """JSON-safe: infinities become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
