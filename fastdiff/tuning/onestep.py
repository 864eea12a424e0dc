"""One-step adapters (HiPA-style): low-rank adapters trained on a frozen denoiser so that one step
from pure noise draws what the base model draws in many.

    adapter = train_onestep(pipe, prompts, rank=16, minutes=30)
    adapter.save("shapes-onestep")        # diffusers-loadable LoRA + manifest

- The base stays frozen; PEFT LoRA layers go on the attention projections and, by default, on the
  ResNet convolutions and the feed-forward layers too (``targets``).
- Targets are the base model's own many-step samples from the same initial noise, guidance
  included (8 DPM-Solver++ 2M steps by default), computed once and cached in `workdir`, so a run
  resumes without recomputing them.
- Loss: a spatial term (latents and decoded pixels against the teacher's) plus HiPA's high-frequency
  term — the Laplacian of the decoded picture against the teacher's (``hf_weight``; 0 for the
  ablation); each term a pseudo-Huber error by default (``loss``).
- Optionally distribution matching (DMD, ``dmd_weight``): a pair-by-pair regression lands on the mean
  of what the teacher makes of nearby noises — soft edges, mixed shades. A second copy of the base, the
  "fake" score, keeps learning to denoise the student's own pictures; at a re-noised student picture,
  the base's guided estimate minus the fake one points from the student's distribution toward the
  teacher's, a whole-picture, prompt-aware pull. Its pictures come from fresh noise (half a batch
  beside the pairs): on the cached noises the student learns the teacher's pictures by heart, so the
  pull is wanted where there are no pairs. ``init`` starts from an adapter already trained — where the
  pull belongs: from a fresh student's first step it made the adapter worse (BENCHMARKS).
- Seeded; resumable from `workdir` (LoRA weights, optimizer, step, RNG); progress per step.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..artefacts import StaleArtefactError, library_versions, lock, publish_folder, weights_hash
from ..checks import check_choice, check_int, check_number, check_seed
from ..denoiser import check_prompts, denoiser_for
from ..sampling.guidance import full_guidance
from ..sampling.guiders import make_guider
from ..sampling.schedule import step_schedule
from ..sampling.solvers import to_x0_eps
from ..stream.batch import LatentStream
from ..stream.prepare import Prepared
from .adapters import FORMAT, KIND, WEIGHTS_FILE, Adapter, AdapterSampling, load_adapter
from .schedules import model_hash, prompts_hash

__all__ = ["TARGETS", "TrainedAdapter", "DistributionMatching", "train_onestep", "teacher_targets", "laplacian"]

# Module-name endings PEFT targets: the attention projections alone, or with the ResNets' convolutions
# and the transformer blocks' feed-forward layers.
TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+conv+ff": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "ff.net.2"),
}

# The teachers' solvers: DPM-Solver++ 2M in 8 steps draws as well as 25 DDIM steps (BENCHMARKS) at a third
# of the cost, so the same minutes buy three times the pairs (a student of 2,048 learned them by heart).
TEACHER_SOLVERS = ("ddim", "dpmpp2m")


def add_lora(module: torch.nn.Module, rank: int, targets: str = "attention+conv+ff") -> list[str]:
    """Freeze `module` and give it a fresh trainable rank-`rank` LoRA (PEFT) on the `targets` layers it
    has; returns the module-name endings targeted."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    present = [t for t in TARGETS[targets] if t.rsplit(".", 1)[-1] in names]
    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=present))
    return present


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """The high-frequency part of [B, C, H, W] images: a per-channel 3×3 Laplacian."""
    kernel = images.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    kernel = kernel.expand(images.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])


# The error terms' shape: "l2" (squared error: the student learns the mean of what the teacher's map
# gives near a noise, soft edges and mixed shades where it is unsure) or "huber" (pseudo-Huber per
# element, linear past HUBER_C: toward the median, so a shape is drawn or left out rather than half-drawn).
LOSSES = ("l2", "huber")
HUBER_C = 0.03


def error(a: torch.Tensor, b: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean error between `a` and `b` under `loss` (see LOSSES)."""
    if loss == "l2":
        return F.mse_loss(a, b)
    return ((a - b).square() + HUBER_C ** 2).sqrt().sub(HUBER_C).mean()


@dataclass
class TrainedAdapter:
    """What :func:`train_onestep` made: the student (base + LoRA), its settings and loss history."""

    student: torch.nn.Module
    sampling: AdapterSampling
    fields: dict
    details: dict = field(default_factory=dict)

    def save(self, folder: str) -> Adapter:
        """Write the LoRA (diffusers' format, loadable by ``pipe.load_lora_weights(folder)``) and its
        manifest into `folder`, atomically; returns it as an :class:`Adapter`."""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self.student)   # PEFT's key layout, which diffusers loads as it is
        sampling = {"scheduler": self.sampling.scheduler, "steps": self.sampling.steps,
                    "timesteps": list(self.sampling.timesteps or []), "guidance_scale": self.sampling.guidance_scale,
                    "config": dict(self.sampling.config), "eta": self.sampling.eta}

        def build(partial):
            StableDiffusionPipeline.save_lora_weights(  # the LoRA config travels in the file's metadata
                partial, unet_lora_layers=layers, safe_serialization=True, weight_name=WEIGHTS_FILE,
                unet_lora_adapter_metadata=self.student.peft_config["default"].to_dict())
            return self.details

        os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
        with lock(folder):
            manifest = publish_folder(folder, self.fields, build, FORMAT,
                                      extra={"kind": KIND, "sampling": sampling, "versions": library_versions(("peft",))})
        return Adapter(folder, self.sampling, "fastdiff", manifest)


@torch.inference_mode()
def teacher_targets(parts: Prepared, cond, uncond, noise: torch.Tensor, steps: int, guidance_scale: float,
                    guidance_rescale: float, batch: int = 64, solver: str = "ddim") -> torch.Tensor:
    """The base model's final latents from `noise` after `steps` steps of `solver` with full CFG."""
    scheduler = parts.pipe.scheduler
    schedule = step_schedule(scheduler, steps=list(range(steps)), num_inference_steps=steps, solver=solver)
    guider = make_guider("full" if guidance_scale > 1 else "none", guidance_scale, 1.0,
                         guidance_rescale if guidance_scale > 1 else 0.0)
    out = []
    for i in range(0, len(noise), batch):
        rows = slice(i, i + batch)
        stream = LatentStream(parts.denoiser, schedule, cond.rows(rows), uncond.rows(rows), tuple(noise.shape[1:]),
                              guider=guider, noise="fresh")
        first = stream.push(None, noise=noise[rows])
        out.append((first if first is not None else stream.drain()[0]).latents.float().cpu())
    return torch.cat(out)


def _teachers(parts, prompts, count, steps, solver, guidance_scale, guidance_rescale, seed, workdir, progress):
    """(prompt index per target, initial noise, teacher latents), cached in `workdir`."""
    height, width = parts.size(None, None)
    shape = parts.latent_shape(height, width)
    key = dict(model=model_hash(parts.denoiser.original), prompts=prompts_hash(prompts), count=count, steps=steps,
               solver=solver, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, seed=seed,
               shape=list(shape))
    path = os.path.join(workdir, "teachers.pt") if workdir else None
    if path and os.path.isfile(path):
        cached = torch.load(path, weights_only=False)
        if cached["key"] == key:
            return cached["index"], cached["noise"], cached["latents"]
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(count) % len(prompts)
    noise = torch.randn((count, *shape), generator=gen)
    cond, uncond = parts.encode([prompts[i] for i in index.tolist()], None, height, width)
    start = time.perf_counter()
    latents = teacher_targets(parts, cond, uncond, noise, steps, guidance_scale, guidance_rescale, solver=solver)
    if progress:
        progress({"stage": "teachers", "count": count, "seconds": round(time.perf_counter() - start, 1)})
    if path:
        os.makedirs(workdir, exist_ok=True)
        torch.save({"key": key, "index": index, "noise": noise, "latents": latents}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return index, noise, latents


def train_onestep(pipe, prompts, rank: int = 16, minutes: float = 30.0, *, iterations: int | None = None,
                  targets: str = "attention+conv+ff", teachers: int = 8192, teacher_steps: int = 8,
                  teacher_solver: str = "dpmpp2m", guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
                  batch: int = 32, lr: float = 1e-3,
                  pixel_weight: float = 1.0, hf_weight: float = 1.0, loss: str = "huber",
                  timestep: int | None = None, dmd_weight: float = 0.0, init=None, seed: int = 0,
                  workdir: str | None = None, progress=None) -> TrainedAdapter:
    """Train a rank-`rank` LoRA on a copy of `pipe`'s denoiser so that one step from pure noise (at the
    scheduler's first timestep, or `timestep`, no guidance) gives the teacher's picture; for `minutes` or
    `iterations` steps, whichever ends first. `prompts` are the training prompts (each gets
    ``teachers / len(prompts)`` noises). `dmd_weight` > 0 adds distribution matching
    (:class:`DistributionMatching`); `init` (an adapter folder of ours, same rank and targets) is where
    the LoRA starts."""
    check_int(rank, "rank", 1, 512)
    check_number(minutes, "minutes", 0.0, low_open=True)
    check_int(iterations, "iterations", 1, optional=True)
    check_int(teachers, "teachers", 1)
    check_choice(teacher_solver, "teacher_solver", TEACHER_SOLVERS)
    check_number(hf_weight, "hf_weight", 0.0)
    check_choice(loss, "loss", LOSSES)
    check_number(pixel_weight, "pixel_weight", 0.0)
    check_int(timestep, "timestep", 0, pipe.scheduler.config.num_train_timesteps - 1, optional=True)
    check_choice(targets, "targets", TARGETS)
    check_number(dmd_weight, "dmd_weight", 0.0)
    check_int(teacher_steps, "teacher_steps", 1)
    check_number(guidance_scale, "guidance_scale", 0.0)
    check_number(guidance_rescale, "guidance_rescale", 0.0, 1.0)
    check_int(batch, "batch", 1, 1 << 16)
    check_number(lr, "lr", 0.0)   # 0: the adapter stays as `init` gave it (the fake score still learns)
    check_seed(seed)
    if workdir is not None and (not isinstance(workdir, (str, os.PathLike)) or os.path.isfile(workdir)):
        raise ValueError(f"workdir must be a folder's path (made if missing), got {workdir!r}")
    init_source = _init_adapter(init, pipe, rank) if init is not None else None
    prompts = check_prompts(prompts, "prompts", (), allow_empty=True)
    adapter_family = denoiser_for(pipe)
    if adapter_family.family != "unet":
        raise ValueError(f"pipe: one-step training is written for SD-family UNets, not {adapter_family.family!r}")
    parts = Prepared(pipe)
    torch.manual_seed(seed)
    index, noise, target = _teachers(parts, prompts, teachers, teacher_steps, teacher_solver, guidance_scale,
                                     guidance_rescale, seed, workdir, progress)
    noise, target = noise.clone(), target.clone()   # plain tensors: they meet autograd below

    # one step from pure noise: at the scheduler's first timestep, or a later one, where the base model
    # already reads the noise for layout rather than ignoring it (zero terminal SNR)
    schedule = (step_schedule(pipe.scheduler, steps=[0], num_inference_steps=teacher_steps, solver="ddim")
                if timestep is None else step_schedule(pipe.scheduler, timesteps=[timestep], solver="ddim"))
    t_first = float(schedule.timesteps[0])
    alpha, beta, noise_scale = float(schedule.alpha[0]), float(schedule.beta[0]), schedule.noise_scale
    base = parts.denoiser.original
    student = copy.deepcopy(base).float().train()
    present = add_lora(student, rank, targets)
    init_hash = _load_init(init_source, student, present) if init_source is not None else None
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    height, width = parts.size(None, None)
    cond_all, uncond_all = parts.encode(prompts, None, height, width)
    embeds = cond_all.embeds.detach().float().clone()
    uncond_embeds = uncond_all.embeds.detach().float().clone().expand_as(embeds)
    matching = DistributionMatching(base, pipe.scheduler, guidance_scale, guidance_rescale) if dmd_weight > 0 else None
    vae = copy.deepcopy(pipe.vae).float().eval().requires_grad_(False)
    scaling = float(vae.config.get("scaling_factor", 1.0) or 1.0)
    shift = float(vae.config.get("shift_factor", 0.0) or 0.0)

    def decode(latents):
        return vae.decode(latents / scaling + shift).sample

    with torch.no_grad():
        target_images = torch.cat([decode(c) for c in target.split(64)]).clamp(-1, 1)

    step, history, rng = 0, [], torch.Generator().manual_seed(seed + 1)
    state_path = os.path.join(workdir, "onestep.pt") if workdir else None
    settings = dict(rank=rank, targets=present, teachers=teachers, teacher_steps=teacher_steps,
                    teacher_solver=teacher_solver, batch=batch, lr=lr,
                    pixel_weight=pixel_weight, hf_weight=hf_weight, loss=loss, timestep=t_first, seed=seed,
                    guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, prompts=prompts_hash(prompts))
    if matching is not None or init_hash is not None:   # older runs' settings stay as they were
        settings.update(dmd_weight=dmd_weight, init=init_hash)
    if matching is not None:   # the pull's pictures are drawn from fresh noise (earlier runs: the pairs')
        settings.update(dmd_noise="fresh")
    if state_path and os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=False)
        if state["settings"] == settings:
            student.load_state_dict(state["student"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            step, history = state["step"], state["history"]
            rng.set_state(state["rng"])
            if matching is not None:
                matching.load_state_dict(state["matching"])
    deadline = time.time() + minutes * 60
    total = iterations or 10**9

    def one_step(start, cond):
        x = noise_scale * start
        out = student(x, torch.full((len(x),), t_first), encoder_hidden_states=cond, return_dict=False)[0]
        return to_x0_eps(out, x, alpha, beta, schedule.prediction_type)[0]

    def fresh():   # noises and prompts for the pull, drawn anew: where the student has no pairs
        count = max(1, batch // 2)
        start = torch.randn((count, *noise.shape[1:]), generator=rng)
        prompt = torch.randint(0, len(embeds), (count,), generator=rng)
        return start, embeds[prompt], uncond_embeds[prompt]

    if matching is not None and not matching.updates:
        # the fake score starts as the base: let it learn the student's pictures before it steers them
        for _ in range(DMD_WARMUP):
            start, cond, uncond = fresh()
            with torch.no_grad():
                x0 = one_step(start, cond)
            matching.update_fake(x0, cond, uncond, rng)
    while step < total and time.time() < deadline:
        rows = torch.randint(0, len(noise), (batch,), generator=rng)
        x0 = one_step(noise[rows], embeds[index[rows]])
        images = decode(x0)
        spatial = error(x0, target[rows], loss) + pixel_weight * error(images, target_images[rows], loss)
        high = error(laplacian(images), laplacian(target_images[rows]), loss)
        total_loss = spatial + hf_weight * high
        if matching is not None:
            start, cond, uncond = fresh()
            drawn = one_step(start, cond)
            match = matching.loss(drawn, cond, uncond, rng)
            total_loss = total_loss + dmd_weight * match
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:   # cosine decay to a tenth over the planned steps
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total)))))
        optimizer.step()
        step += 1
        history.append({"step": step, "loss": total_loss.item(), "spatial": spatial.item(), "high": high.item()})
        if matching is not None:
            history[-1]["match"] = match.item()
            history[-1]["fake"] = matching.update_fake(drawn.detach(), cond, uncond, rng)
        if progress and (step % 25 == 0 or step == 1):
            progress(history[-1])
        if state_path and step % 200 == 0:
            _save_state(state_path, student, optimizer, step, history, rng, settings, matching)
    if state_path:
        _save_state(state_path, student, optimizer, step, history, rng, settings, matching)
    sampling = AdapterSampling(None, 1, (t_first,), 1.0)
    fields = {"base": model_hash(base), "family": adapter_family.family, "rank": rank, "targets": present,
              "steps": 1, "prompts": prompts_hash(prompts)}
    details = {"settings": settings, "iterations": step, "final_loss": history[-1] if history else None,
               "first_loss": history[0] if history else None, "base_weights": weights_hash(base)[:16]}
    return TrainedAdapter(student.eval(), sampling, fields, details)


def _save_state(path, student, optimizer, step, history, rng, settings, matching=None):
    from peft.utils import get_peft_model_state_dict

    lora = {k: v for k, v in student.state_dict().items() if "lora_" in k}
    state = {"student": lora, "optimizer": optimizer.state_dict(), "step": step, "history": history,
             "rng": rng.get_state(), "settings": settings, "peft": len(get_peft_model_state_dict(student))}
    if matching is not None:
        state["matching"] = matching.state_dict()
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _init_adapter(init, pipe, rank: int) -> Adapter:
    """Adapter `init`, checked before any work: ours, for this base, of rank `rank`."""
    try:
        source = load_adapter(init, pipe)
    except (ValueError, StaleArtefactError) as error:   # missing, not an adapter, or for another base
        raise type(error)(f"init: {error}") from error
    fields = (source.manifest or {}).get("fields", {})
    if source.manifest is None or fields.get("rank") != rank:
        raise ValueError(f"init: {source.path} is not a fastdiff adapter of rank {rank} "
                         f"(it has rank {fields.get('rank')})")
    return source


def _load_init(source: Adapter, student, present: list[str]) -> str:
    """Load `source`'s LoRA (on the same targets) into `student`; returns its weights' hash for the settings."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if source.manifest["fields"].get("targets") != present:
        raise ValueError(f"init: {source.path} targets {source.manifest['fields'].get('targets')}, not {present}")
    weights = {k.removeprefix("unet."): v for k, v in load_file(source.weights).items()}
    unexpected = set_peft_model_state_dict(student, weights).unexpected_keys
    if unexpected:
        raise ValueError(f"init: {source.path} holds weights this denoiser lacks ({unexpected[:3]}...)")
    return source.manifest["files"][WEIGHTS_FILE]["sha256"][:16]


# DMD's settings: the student's pictures are re-noised anywhere in 2–98% of the schedule; the fake score
# learns at its own rate, with captions dropped as the base was trained (so that it can be guided), and
# takes DMD_WARMUP steps on the student's pictures before the first pull. At 1e-4 the fake lagged and the
# pull levelled off; 1e-3 took the distance further on the shapes model (BENCHMARKS).
DMD_RANGE = (0.02, 0.98)
DMD_FAKE_LR = 1e-3
DMD_WARMUP = 100
DMD_CAPTION_DROPOUT = 0.1


class DistributionMatching:
    """Distribution matching distillation's pull on a one-step student.

    `real` is the frozen base; `fake` a trainable copy of it that keeps learning (the usual denoising
    loss) to denoise the student's latest pictures. Re-noise a student picture x0 to x_t: x̂0_fake −
    x̂0_real at x_t is the gradient of the KL divergence from the teacher's distribution to the
    student's, up to weighting; it is normalised by each picture's mean distance to x̂0_real, as in the
    paper. Both are read with the teacher's guidance: DMD reads the fake unguided, which pulls toward
    more guidance until the fake has learned the guided pictures — more steps than a CPU's half hour
    gives. Guided alike, the two agree at the start and only what the fake learns pulls."""

    def __init__(self, base, scheduler, guidance_scale: float, guidance_rescale: float):
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"dmd_weight: distribution matching takes epsilon or v_prediction models, "
                             f"not {self.prediction_type!r}")
        cumulative = scheduler.alphas_cumprod.float()
        self.alpha, self.beta = cumulative.sqrt(), (1 - cumulative).sqrt()
        self.low, self.high = (int(f * len(cumulative)) for f in DMD_RANGE)
        self.scale, self.rescale = guidance_scale, guidance_rescale
        self.real = copy.deepcopy(base).float().eval().requires_grad_(False)
        self.fake = copy.deepcopy(base).float().train().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.fake.parameters(), lr=DMD_FAKE_LR, weight_decay=0.0)
        self.updates = 0

    def _noised(self, x0, rng):
        t = torch.randint(self.low, self.high, (len(x0),), generator=rng)
        eps = torch.randn(x0.shape, generator=rng)
        alpha, beta = self.alpha[t].view(-1, 1, 1, 1), self.beta[t].view(-1, 1, 1, 1)
        return t, eps, alpha, beta, alpha * x0 + beta * eps

    def _guided_x0(self, module, x, t, cond, uncond, alpha, beta):
        out_u, out_c = module(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]),
                              return_dict=False)[0].chunk(2)
        guided = full_guidance(out_u, out_c, self.scale, self.rescale)
        return to_x0_eps(guided, x, alpha, beta, self.prediction_type)[0]

    def loss(self, x0, cond, uncond, rng) -> torch.Tensor:
        """A surrogate whose gradient in `x0` is the normalised x̂0_fake − x̂0_real."""
        with torch.no_grad():
            t, _, alpha, beta, x = self._noised(x0.detach(), rng)
            real = self._guided_x0(self.real, x, t, cond, uncond, alpha, beta)
            fake = self._guided_x0(self.fake, x, t, cond, uncond, alpha, beta)
            weight = (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            pull = (fake - real) / weight
        return 0.5 * F.mse_loss(x0, x0.detach() - pull)

    def update_fake(self, x0, cond, uncond, rng) -> float:
        """One denoising step of the fake score on the student's pictures `x0` (detached)."""
        t, eps, alpha, beta, x = self._noised(x0, rng)
        dropped = (torch.rand(len(x0), generator=rng) < DMD_CAPTION_DROPOUT).view(-1, 1, 1)
        out = self.fake(x, t, encoder_hidden_states=torch.where(dropped, uncond, cond), return_dict=False)[0]
        loss = F.mse_loss(out, self.target(x0, eps, alpha, beta))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        return loss.item()

    def target(self, x0, eps, alpha, beta) -> torch.Tensor:
        """What the denoiser predicts at alpha·x0 + beta·eps: eps, or the velocity alpha·eps − beta·x0."""
        return eps if self.prediction_type == "epsilon" else alpha * eps - beta * x0

    def state_dict(self) -> dict:
        return {"fake": self.fake.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.fake.load_state_dict(state["fake"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]
