"""Train the shapes-world model on the CPU, in resumable parts: ``python -m fastdiff.shapes.train STAGE``.

Stages: ``init`` (seed a workdir from the committed weights, to warm-start instead of training
from scratch), ``vae`` (reconstruct rendered scenes), ``text`` (the text encoder pretrained CLIP-style against
a small image tower, optional), ``unet`` (the UNet on the VAE's latents, with the text encoder: the
pretrained one frozen when ``text`` ran, else trained jointly from scratch),
``export`` (the EMA weights as an fp16 pipeline in :data:`~fastdiff.shapes.model.WEIGHTS_DIR`) and
``eval`` (attribute accuracy of generated pictures per held-out kind, coverage, VAE PSNR; through
plain diffusers, an independent check of the weights). Each training invocation runs for
``--minutes`` and then checkpoints to ``--workdir``; the next one continues the step count, the
optimizer, the EMA and the data RNG, so a long run can be split over several.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import model as M
from .evaluate import ATTRIBUTES, attribute_accuracy
from .metrics import coverage_by_attribute
from .render import SHAPES, Scene, batch_scenes, batch_tensors, heldout_prompts, reshape, scene_tensors

__all__ = ["main", "init_from_weights", "train_vae", "train_text", "shape_retrieval", "train_unet", "pipeline_from_workdir", "export", "evaluate", "vae_psnr"]

DEFAULT_WORKDIR = os.path.expanduser("~/.cache/fastdiff/shapes-train")
# Defaults per stage: total steps (the cosine schedule's length), batch, learning rate, EMA decay,
# bf16 autocast. bf16 was measured on a CPU with native bf16 (AMX): the VAE's 64×64 convolutions
# run 1.6× faster (0.55 vs 0.9 s/step), the UNet's small 8×8 tensors 1.7× slower, so only the VAE uses it.
# Without native bf16 (an AVX2-only CPU) it is emulated and 7× slower: see :func:`_native_bf16`.
DEFAULTS = {
    "vae": dict(steps=4000, batch=32, lr=1e-3, ema=0.998, bf16=1),
    "text": dict(steps=3000, batch=256, lr=5e-4, ema=0.998, bf16=0),
    "unet": dict(steps=11000, batch=64, lr=4e-4, ema=0.999, bf16=0),  # the committed weights' run
}
CAPTION_DROPOUT = 0.1  # share of captions replaced by "" so classifier-free guidance has an unconditional
# Share of each UNet batch that are shape twins of others (the same picture, noise and step with one
# object's shape and its word changed): the pair's targets differ only where that shape does, which
# a model that ignores the shape word cannot fit. Without them the shape word got little of the
# UNet's attention (the picture's few corner pixels per object weigh little in the loss).
SHAPE_TWIN_SHARE = 0.25
MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting: stops the easy low-noise steps from dominating
KL_WEIGHT = 1e-6


# --- checkpoints -------------------------------------------------------------------------------

def _ckpt_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, f"{stage}.pt")


def _save(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken checkpoint


def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, step: int, decay: float) -> None:
    # Warm-up: early on the average follows the weights closely, or it would remember the random init.
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - d)


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine down to a tenth of the peak at `total` steps (flat after)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Loop:
    """A training loop's shared plumbing: the step/time budget, the RNGs, progress and checkpoints."""

    def __init__(self, args, stage: str, modules: dict, params):
        self.args, self.stage = args, stage
        self.path = _ckpt_path(args.workdir, stage)
        self.modules = modules
        self.ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        self.step = 0
        self.rng = np.random.default_rng(args.seed)
        torch.manual_seed(args.seed)
        self.extra: dict = {}
        state = _load(self.path)
        if state is not None:
            for k, m in modules.items():
                m.load_state_dict(state["model"][k])
                self.ema[k].load_state_dict(state["ema"][k])
            self.opt.load_state_dict(state["opt"])
            self.step = state["step"]
            self.rng.bit_generator.state = state["np_rng"]
            torch.set_rng_state(state["torch_rng"])
            self.extra = state.get("extra", {})
            print(f"{stage}: resumed at step {self.step} from {self.path}")

    def save(self) -> None:
        _save(self.path, dict(
            step=self.step, model={k: m.state_dict() for k, m in self.modules.items()},
            ema={k: m.state_dict() for k, m in self.ema.items()}, opt=self.opt.state_dict(),
            np_rng=self.rng.bit_generator.state, torch_rng=torch.get_rng_state(), extra=self.extra,
        ))

    def run(self, step_fn) -> None:
        """Call ``step_fn()`` (returns the loss) until the step target or the time budget is reached."""
        args = self.args
        start = last_save = time.time()
        bar = tqdm(total=args.steps, initial=self.step, desc=self.stage, dynamic_ncols=True)
        smooth, done = None, 0
        while self.step < args.steps and time.time() - start < args.minutes * 60:
            for group in self.opt.param_groups:
                group["lr"] = _lr(self.step, args.steps, args.lr)
            if args.threads is None and done % 25 == 0:
                _fit_threads()
            loss = step_fn()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
            self.opt.step()
            for k, m in self.modules.items():
                _ema_update(self.ema[k], m, self.step - self.extra.get("ema_from", 0), args.ema)
            self.step += 1
            done += 1
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", s_per_step=f"{(time.time() - start) / done:.2f}")
            if time.time() - last_save > args.save_minutes * 60:
                self.save()
                last_save = time.time()
        bar.close()
        self.save()
        elapsed = time.time() - start
        print(f"{self.stage}: step {self.step}/{args.steps}, {done} steps in {elapsed / 60:.1f} min "
              f"({elapsed / max(done, 1):.2f} s/step), saved {self.path}")


def _fit_threads() -> None:
    """Use every core when the machine is ours, one thread when others are busy on it.

    The CPU is shared: two processes with a thread per core each spin against each other and run
    ~10× slower than either would with one thread, so the thread count follows the load.
    """
    cores = os.cpu_count() or 1
    mine = torch.get_num_threads()
    others = os.getloadavg()[0] - mine  # the 1-minute load average, less what we add ourselves
    torch.set_num_threads(cores if others < 0.6 else max(1, cores // 2))


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is
    emulated, and the VAE encode under it took 6.6 s instead of 0.9 s on an AVX2-only CPU."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _bf16(enabled: bool):
    """bf16 autocast where asked for and the CPU computes it natively."""
    return torch.autocast("cpu", torch.bfloat16, enabled=enabled and _native_bf16())


def _autocast(args):
    return _bf16(bool(args.bf16))


# --- VAE ---------------------------------------------------------------------------------------

def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def train_vae(args) -> None:
    vae = M.build_vae().train()
    loop = _Loop(args, "vae", {"vae": vae}, vae.parameters())

    def step():
        x, _ = batch_tensors(args.batch, loop.rng)
        with _autocast(args):
            posterior = vae.encode(x).latent_dist
            out = vae.decode(posterior.sample()).sample
        out = out.float()
        # L1 keeps flat areas exact, L2 punishes the rare big misses, the gradient term keeps edges sharp.
        loss = (out - x).abs().mean() + (out - x).pow(2).mean()
        loss = loss + sum((a - b).abs().mean() for a, b in zip(_edges(out), _edges(x)))
        return loss + KL_WEIGHT * posterior.kl().mean()

    loop.run(step)
    psnr = vae_psnr(loop.ema["vae"].eval(), getattr(args, "psnr_images", 512))
    print(f"vae: reconstruction PSNR of the EMA weights {psnr:.2f} dB")


def _load_vae(workdir: str):
    state = _load(_ckpt_path(workdir, "vae"))
    if state is None:
        raise FileNotFoundError(f"no VAE checkpoint in {workdir}: run the 'vae' stage first")
    vae = M.build_vae()
    vae.load_state_dict(state["ema"]["vae"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def measure_scaling_factor(vae, n: int = 1024, seed: int = 12345) -> float:
    """1/std of latents of rendered scenes, so the UNet sees unit-variance latents."""
    x, _ = batch_tensors(n, np.random.default_rng(seed))
    z = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in x.split(256)])
    return float(1.0 / z.std())


# --- text encoder, CLIP-style ------------------------------------------------------------------
# Trained jointly with the UNet from scratch, the text encoder barely tells shape words apart: the
# UNet's loss gives a shape (a few corner pixels per object) little gradient, and x̂0 then follows
# the picture, not the shape word. SD's text encoder is CLIP, pretrained contrastively against
# images, which is what makes its words distinct. This stage does the same on the renderer's stream.

class ImageTower(torch.nn.Module):
    """A small CNN from 64×64 renders to the text encoder's projection space. Its 4×4 map is
    flattened, not pooled, so that where an object is (a word of the caption) stays in it."""

    def __init__(self, dim: int):
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128, 128):   # 64 → 32 → 16 → 8 → 4
            layers += [torch.nn.Conv2d(channels, width, 3, stride=2, padding=1), torch.nn.GroupNorm(8, width),
                       torch.nn.SiLU()]
            channels = width
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _contrastive_loss(text: torch.Tensor, image: torch.Tensor, log_scale: torch.Tensor,
                      negatives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's caption–picture similarities; `negatives`
    are further pictures no caption fits, which each caption must rank below its own."""
    scale = log_scale.clamp(max=math.log(100)).exp()
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    pictures = image if negatives is None else torch.cat([image, F.normalize(negatives, dim=-1)])
    labels = torch.arange(len(text))
    return (F.cross_entropy(scale * text @ pictures.T, labels) + F.cross_entropy(scale * image @ text.T, labels)) / 2


def _shape_twin(scene: Scene, text: str, rng: np.random.Generator) -> tuple[Scene, str]:
    """The same picture and caption with one object's shape changed (its place, size, turn and
    wording kept). Random negatives almost never differ from a caption in shape alone, so without
    these twins the contrastive loss learns colour, size and place and leaves shape words nearly
    alike; the UNet stage trains on them too (see :data:`SHAPE_TWIN_SHARE`)."""
    i = int(rng.integers(len(scene.objects)))
    other = [s for s in SHAPES if s != scene.objects[i].shape][int(rng.integers(len(SHAPES) - 1))]
    return reshape(scene, text, i, other)


def contrastive_heads() -> torch.nn.ModuleDict:
    """What the ``text`` stage trains beside the text encoder: the text projection, the image tower
    and CLIP's learned log temperature (``log_scale``)."""
    dim = M.TEXT_CONFIG["projection_dim"]
    heads = torch.nn.ModuleDict({
        "text_projection": torch.nn.Linear(M.TEXT_CONFIG["hidden_size"], dim, bias=False),
        "image": ImageTower(dim),
    })
    heads.register_parameter("log_scale", torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))))
    return heads


def train_text(args) -> None:
    tokenizer = M.build_tokenizer()
    text_encoder = M.build_text_encoder(tokenizer).train()
    heads = contrastive_heads()
    loop = _Loop(args, "text", {"text_encoder": text_encoder, "heads": heads},
                 list(text_encoder.parameters()) + list(heads.parameters()))

    def step():
        scenes, captions = batch_scenes(args.batch, loop.rng)
        twins = [_shape_twin(scene, text, loop.rng)[0] for scene, text in zip(scenes, captions)]   # hard negatives
        pictures = heads["image"](scene_tensors(scenes + twins))
        ids = tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        pooled = text_encoder(ids).pooler_output   # the end-of-text token's state, as CLIP projects it
        return _contrastive_loss(heads["text_projection"](pooled), pictures[:len(scenes)], heads.log_scale,
                                 negatives=pictures[len(scenes):])

    loop.run(step)


def pretrained_text_encoder(workdir: str, tokenizer):
    """The EMA text encoder of the ``text`` stage in `workdir`, frozen; None if that stage never ran."""
    state = _load(_ckpt_path(workdir, "text"))
    if state is None:
        return None
    text_encoder = M.build_text_encoder(tokenizer)
    text_encoder.load_state_dict(state["ema"]["text_encoder"])
    return text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def shape_retrieval(workdir: str, n: int = 256, seed: int = 777) -> dict[str, float]:
    """How well the ``text`` stage's EMA encoder tells shape words apart: over `n` captions stating
    every shape, the share in which the caption's own picture outranks each of its one-object shape
    swaps (``pairwise``), and outranks all of them at once (``all``, also per object count)."""
    state = _load(_ckpt_path(workdir, "text"))
    if state is None:
        raise FileNotFoundError(f"no text stage checkpoint in {workdir}")
    tokenizer = M.build_tokenizer()
    text_encoder = pretrained_text_encoder(workdir, tokenizer)
    heads = contrastive_heads()
    heads.load_state_dict(state["ema"]["heads"])
    scenes, captions = batch_scenes(n, np.random.default_rng(seed), hide_prob=0.0)
    ids = tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    text = F.normalize(heads["text_projection"](text_encoder(ids).pooler_output), dim=-1)
    pairwise, best = [], {}
    for scene, caption, t in zip(scenes, captions, text):
        swaps = [reshape(scene, caption, i, other)[0] for i, o in enumerate(scene.objects)
                 for other in SHAPES if other != o.shape]
        similarity = F.normalize(heads["image"](scene_tensors([scene] + swaps)), dim=-1) @ t
        pairwise.append(float((similarity[1:] < similarity[0]).float().mean()))
        best.setdefault(len(scene.objects), []).append(float(similarity.argmax() == 0))
    result = {"pairwise": float(np.mean(pairwise)), "all": float(np.mean(sum(best.values(), [])))}
    result.update({f"all, {k} objects": float(np.mean(v)) for k, v in sorted(best.items())})
    return result


# --- UNet --------------------------------------------------------------------------------------

def _unet_loop(args, unet, text_encoder, frozen: bool) -> _Loop:
    """The ``unet`` stage's loop: the optimizer takes the text encoder's weights only when it trains
    jointly, and the checkpoint records which it is."""
    params = list(unet.parameters()) + ([] if frozen else list(text_encoder.parameters()))
    loop = _Loop(args, "unet", {"unet": unet, "text_encoder": text_encoder}, params)
    loop.extra["text_encoder"] = "pretrained, frozen" if frozen else "joint"
    return loop


def _twinned_batch(n: int, pairs: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """The UNet stage's `n` pictures and captions (a share dropped to "" for guidance); the last
    `pairs` are shape twins of the first `pairs`, dropped with them."""
    scenes, captions = batch_scenes(n - pairs, rng)
    twins = [_shape_twin(scene, text, rng) for scene, text in zip(scenes[:pairs], captions[:pairs])]
    scenes, captions = scenes + [s for s, _ in twins], captions + [c for _, c in twins]
    drop = rng.random(n - pairs) < CAPTION_DROPOUT
    drop = np.concatenate([drop, drop[:pairs]])
    return scene_tensors(scenes), ["" if d else c for c, d in zip(captions, drop)]


def train_unet(args) -> None:
    vae = _load_vae(args.workdir)
    tokenizer = M.build_tokenizer()
    # A pretrained text encoder stays frozen, as CLIP does under SD's UNet; without one, the text
    # encoder learns with the UNet. A resumed run keeps the choice it started with.
    resuming = os.path.exists(_ckpt_path(args.workdir, "unet"))
    pretrained = pretrained_text_encoder(args.workdir, tokenizer)
    if resuming:
        frozen = (_load(_ckpt_path(args.workdir, "unet")).get("extra") or {}).get("text_encoder") == "pretrained, frozen"
    else:
        frozen = pretrained is not None
    if frozen and pretrained is None:
        raise FileNotFoundError(f"the UNet run in {args.workdir} froze a pretrained text encoder, but text.pt is gone")
    text_encoder = pretrained if frozen else M.build_text_encoder(tokenizer).train()
    unet = M.build_unet().train()
    scheduler = M.build_scheduler()
    loop = _unet_loop(args, unet, text_encoder, frozen)
    print(f"unet: text encoder {loop.extra['text_encoder']}")
    objective = scheduler.config.prediction_type
    # (checkpoints from before the objective was recorded were all ε-prediction)
    if loop.extra.setdefault("prediction_type", objective if loop.step == 0 else "epsilon") != objective:
        # Resumed under another objective: the average of the old one's weights would pull the new
        # model back, so the EMA restarts from the live weights (with its warm-up).
        for name, module in loop.modules.items():
            loop.ema[name].load_state_dict(module.state_dict())
        loop.extra.update(prediction_type=objective, ema_from=loop.step)
        print(f"unet: objective changed to {objective} at step {loop.step}; EMA restarted")
    # (checkpoints from before twins were recorded trained without them)
    loop.extra.setdefault("shape_twins", SHAPE_TWIN_SHARE if loop.step == 0 else 0.0)
    if "scaling_factor" not in loop.extra:
        loop.extra["scaling_factor"] = measure_scaling_factor(vae)
    scale = loop.extra["scaling_factor"]
    print(f"unet: latent scaling factor {scale:.4f}")
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    velocity = scheduler.config.prediction_type == "v_prediction"
    # Min-SNR weights: an error in x̂0 counts min(SNR + 1, γ) (v) or min(SNR, γ) (ε) times, so the
    # easy low-noise steps don't dominate; with v the pure-noise step (SNR 0) keeps full weight.
    weight = torch.clamp(MIN_SNR_GAMMA / (snr + 1), max=1.0) if velocity else torch.clamp(snr, max=MIN_SNR_GAMMA) / snr

    def step():
        pairs = int(args.batch * loop.extra["shape_twins"])
        x, captions = _twinned_batch(args.batch, pairs, loop.rng)
        ids = tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad(), _bf16(True):  # the VAE is fast in native bf16
            latents = vae.encode(x).latent_dist.sample().float() * scale
        noise = torch.randn(len(x) - pairs, *latents.shape[1:])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x) - pairs,))
        noise, t = torch.cat([noise, noise[:pairs]]), torch.cat([t, t[:pairs]])   # a twin shares its original's
        noisy = scheduler.add_noise(latents, noise, t)
        with _autocast(args):
            with torch.set_grad_enabled(not frozen):
                context = text_encoder(ids)[0]
            pred = unet(noisy, t, context).sample
        target = scheduler.get_velocity(latents, noise, t) if velocity else noise
        per_item = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (weight[t] * per_item).mean()

    loop.run(step)


def init_from_weights(workdir: str, folder: str | None = None) -> None:
    """Seed `workdir` from a trained pipeline folder (default: the committed weights), so that the
    ``unet`` stage warm-starts from it: vae.pt (counted as done), and unet.pt at step 0 with a fresh
    optimizer, so the learning rate warms up again and its cosine runs over the new ``--steps``.
    With a ``text`` stage's text.pt in `workdir`, that encoder is frozen under the UNet (whose
    cross-attention then relearns it); else the pipeline's encoder trains on with the UNet.
    Checkpoints already in `workdir` are kept."""
    pipe = M.load_pipeline(folder=folder)

    def stage_args(stage):   # what a loop reads of the command line
        return argparse.Namespace(workdir=workdir, seed=0, lr=DEFAULTS[stage]["lr"])

    if not os.path.exists(_ckpt_path(workdir, "vae")):
        vae = pipe.vae.float()
        loop = _Loop(stage_args("vae"), "vae", {"vae": vae}, vae.parameters())
        loop.step = DEFAULTS["vae"]["steps"]
        loop.save()
    if os.path.exists(_ckpt_path(workdir, "unet")):
        print(f"init: {_ckpt_path(workdir, 'unet')} exists, kept")
        return
    pretrained = pretrained_text_encoder(workdir, M.build_tokenizer())
    loop = _unet_loop(stage_args("unet"), pipe.unet.float(),
                      pretrained if pretrained is not None else pipe.text_encoder.float(), pretrained is not None)
    loop.extra.update(prediction_type=pipe.scheduler.config.prediction_type,
                      scaling_factor=float(pipe.vae.config.scaling_factor), warm_start=folder or M.WEIGHTS_DIR)
    loop.save()
    print(f"init: {workdir} seeded from {folder or M.WEIGHTS_DIR} (text encoder {loop.extra['text_encoder']})")


# --- pipeline, export, evaluation --------------------------------------------------------------

def pipeline_from_workdir(workdir: str = DEFAULT_WORKDIR, tokenizer_dir: str | None = None):
    """The EMA weights of the checkpoints in `workdir` as a float32 StableDiffusionPipeline."""
    state = _load(_ckpt_path(workdir, "unet"))
    if state is None:
        raise FileNotFoundError(f"no UNet checkpoint in {workdir}: run the 'unet' stage first")
    vae = _load_vae(workdir)
    vae.register_to_config(scaling_factor=state["extra"]["scaling_factor"])
    tokenizer = M.build_tokenizer(tokenizer_dir)
    text_encoder, unet = M.build_text_encoder(tokenizer), M.build_unet()
    text_encoder.load_state_dict(state["ema"]["text_encoder"])
    unet.load_state_dict(state["ema"]["unet"])
    pipe = M.build_pipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(workdir: str = DEFAULT_WORKDIR, folder: str = M.WEIGHTS_DIR) -> str:
    """Save the trained pipeline in fp16 safetensors to `folder` (replacing what was there)."""
    import shutil

    pipe = pipeline_from_workdir(workdir)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    print(f"exported to {folder}: {size / 1e6:.2f} MB")
    return folder


@torch.no_grad()
def vae_psnr(vae, n: int = 512, seed: int = 54321) -> float:
    """Reconstruction PSNR (dB, pixels in [0, 1]) of the VAE's mean latent on rendered scenes."""
    x, _ = batch_tensors(n, np.random.default_rng(seed))
    dtype = next(vae.parameters()).dtype
    out = torch.cat([vae.decode(vae.encode(c.to(dtype)).latent_dist.mode()).sample.float() for c in x.split(128)])
    mse = ((out.clamp(-1, 1) - x) / 2).pow(2).mean()
    return float(-10 * torch.log10(mse))


def _generate(pipe, prompts, guidance, steps, batch, seed, rescale):
    images = []
    for i in range(0, len(prompts), batch):
        generator = torch.Generator().manual_seed(seed + i)
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                   output_type="pt", height=64, width=64, guidance_rescale=rescale)
        images.append(out.images.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def evaluate(pipe, kind: str = "one", count: int = 256, guidance: float = M.GUIDANCE_SCALE, steps: int = 25,
             batch: int = 64, seed: int = 0, rescale: float = M.GUIDANCE_RESCALE) -> dict[str, float]:
    """Attribute accuracy of pictures `pipe` (a plain diffusers pipeline) generates for `count`
    held-out `kind` prompts."""
    prompts = [p for p, _ in heldout_prompts(kind, count)]
    return attribute_accuracy(_generate(pipe, prompts, guidance, steps, batch, seed, rescale), prompts,
                              value_range=(0.0, 1.0))


@torch.no_grad()
def evaluate_coverage(pipe, count: int = 32, repeats: int = 8, guidance: float = M.GUIDANCE_SCALE,
                      steps: int = 25, batch: int = 64, seed: int = 0, rescale: float = M.GUIDANCE_RESCALE) -> dict:
    """Coverage of what `count` held-out unstated prompts leave free, each drawn from `repeats` seeds."""
    prompts = [p for p, _ in heldout_prompts("unstated", count) for _ in range(repeats)]
    return coverage_by_attribute(_generate(pipe, prompts, guidance, steps, batch, seed, rescale), prompts,
                                 value_range=(0.0, 1.0))


def _report(name: str, result: dict) -> None:
    keys = ["overall", *ATTRIBUTES, "count", "exact"]
    print(f"{name}: " + "  ".join(f"{k} {100 * result[k]:.1f}%" for k in keys if result[k] == result[k]))


def run_eval(args) -> None:
    if args.source == "weights":
        pipe = M.load_pipeline()
    else:
        if os.path.exists(_ckpt_path(args.workdir, "text")):
            print("text encoder shape retrieval: " + "  ".join(
                f"{k} {v:.3f}" for k, v in shape_retrieval(args.workdir).items()))
        pipe = pipeline_from_workdir(args.workdir)
    print(f"VAE reconstruction PSNR: {vae_psnr(pipe.vae.float()):.2f} dB")
    for guidance in args.guidance:
        for rescale in args.rescale:
            for kind in args.kinds:
                _report(f"{kind}, guidance {guidance}, rescale {rescale}",
                        evaluate(pipe, kind, args.count, guidance, args.inference_steps, rescale=rescale))
            # As many unstated prompts as each kind's count, 8 seeds each: fewer read coverage
            # coarsely (32 prompts × 8 read 0.838 at guidance 2.5, 256 × 8 read 0.821).
            spread = evaluate_coverage(pipe, max(2, args.count), 8, guidance, args.inference_steps,
                                       rescale=rescale)
            print(f"coverage, guidance {guidance}, rescale {rescale}: "
                  + "  ".join(f"{k} {v:.3f}" for k, v in spread.items()))


# --- command line ------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["init", "vae", "text", "unet", "export", "eval"])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--minutes", type=float, default=30.0, help="time budget of this invocation")
    parser.add_argument("--steps", type=int, default=None, help="total steps to train to (the LR schedule's length)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--ema", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", type=int, default=None, help="bf16 autocast (1) or float32 (0)")
    parser.add_argument("--save-minutes", type=float, default=5.0, help="checkpoint every so often")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--psnr-images", type=int, default=512,
                        help="vae: rendered scenes its closing reconstruction PSNR is read on")
    parser.add_argument("--weights", default=None, help="init: the pipeline folder to seed from (default: the committed one)")
    # eval
    parser.add_argument("--source", choices=["workdir", "weights"], default="workdir")
    parser.add_argument("--count", type=int, default=256,
                        help="eval: held-out prompts per kind (and unstated prompts × 8 seeds for coverage)")
    parser.add_argument("--kinds", nargs="+", default=["one", "two", "three", "unstated"])
    parser.add_argument("--guidance", type=float, nargs="+", default=[M.GUIDANCE_SCALE])
    parser.add_argument("--rescale", type=float, nargs="+", default=[M.GUIDANCE_RESCALE],
                        help="guidance_rescale values to evaluate")
    parser.add_argument("--inference-steps", type=int, default=25)
    args = parser.parse_args(argv)
    if args.psnr_images < 1:
        parser.error(f"--psnr-images must be at least 1, got {args.psnr_images}")
    for key, value in DEFAULTS.get(args.stage, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    if args.stage == "init":
        init_from_weights(args.workdir, args.weights)
    elif args.stage == "vae":
        train_vae(args)
    elif args.stage == "text":
        train_text(args)
    elif args.stage == "unet":
        train_unet(args)
    elif args.stage == "export":
        export(args.workdir)
    else:
        run_eval(args)


if __name__ == "__main__":
    main()
