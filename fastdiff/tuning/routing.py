"""Prompt-routed pruning (APTP, "Not All Prompts Are Made Equal"): a router sends each prompt to one
of K architecture codes, each a physically pruned sub-network of the denoiser sized to its prompts.

    router = train_router(pipe, prompts, images, codes=4, target=0.6, minutes=40)
    router.save("shapes-router")
    fast = fastdiff.accelerate(pipe, router="shapes-router")   # rows grouped by code, one call each

Training, the denoiser frozen (:mod:`.pruning` holds the units and gates):

- the router: the pipeline's own text encoder, pooled and frozen → a small head → an architecture
  vector, compared by cosine with K learned codes; each code holds gate logits over every unit;
- each row of a batch is assigned a code by a balanced transport plan (Sinkhorn, so the codes don't
  collapse) and takes that code's gates: Gumbel-sigmoid with a straight-through hard threshold;
- losses: distillation to the full model's output and its up-block features; the resource loss
  |log(mean MACs ratio / target)|; a contrastive loss aligning prompt similarity with the router's
  architecture similarity; the router's cross-entropy against the plan;
- graded codes (``spread``): each code also has a size of its own, spread evenly around the target
  (``target · (1 ± spread)``, the mean kept), pulled by the same log-ratio loss. With one shared
  target the codes all settle at the target's size and no prompt can get a bigger network than
  another (what we measured on the shapes world);
- the plan by need (``by_need``): Sinkhorn runs on each row's distillation loss under every code's
  current architecture, so the rows that lose most in a small network get the big codes, and the
  router learns to foresee that from the prompt. APTP balances on the router's own scores instead
  (``by_need=False``); on the shapes world that left one-, two- and three-object prompts with the
  same mean MACs;
- nested codes (``nested``): one shared vector of gate logits and a level per code, so all codes
  rank the gates alike and each smaller code's network lies inside every larger one's. Every row
  then trains the one ranking (a single pruned model's data), where independent codes each learn
  from the quarter of the rows routed to them;
- the codes' final architectures are their logits thresholded at their sizes (:func:`sized_gates`);
- then each code's sub-network is pruned for real (:func:`.pruning.prune`) and fine-tuned on the
  prompts routed to it, the full model as teacher: a low-rank adapter (``finetune_rank``, PEFT's
  LoRA on the same layers as the one-step adapter's), merged into the pruned weights once trained.
  The artefact then holds only the adapters, since the pruned weights follow from the base model
  and the gates: a few MB for four codes, where whole sub-networks would take about 80 MB on the
  shapes model (``finetune_rank=0`` fine-tunes and stores every weight). Or (``finetune="shared"``)
  one adapter on the full network, each row run through its code's gates, merged and then pruned
  per code: the codes share what they keep, and every prompt trains it (one adapter in the file).

Training data: noisy latents of pictures of the prompts (``images``, e.g. the shapes world's
renderer), at random timesteps. The trained :class:`.routers.Router` is the artefact: the router's
weights, the codes' gates and the sub-networks' fine-tuning, with a manifest.

:func:`join_routers` makes one router over the codes of routers trained apart (e.g. single pruned
models at different sizes): only its head is trained, by need. :func:`calibrate_router` shifts a
trained router's codes so that the prompts it will serve cost a chosen share of the MACs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F

from ..artefacts import StaleArtefactError
from ..checks import check_choice, check_int, check_number
from ..denoiser import check_prompts, denoiser_for
from .pruning import GROUPS, Unit, attach_gates, gate_size, keep_one, macs_of, prunable_units, prune, unit_macs
from .routers import Router, RouterHead, load_router, merge_lora, placed_like, plain_base, pooled_prompts
from .schedules import model_hash, prompts_hash

__all__ = ["train_router", "join_routers", "calibrate_router", "sinkhorn", "shares_for", "gumbel_sigmoid",
           "code_targets", "sized_gates"]

FINETUNES = ("per-code", "shared")


def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             shares: torch.Tensor | None = None) -> torch.Tensor:
    """A balanced soft assignment [B, K] from scores: each row sums to 1 and every code gets an equal
    share of the rows, or `shares` [K] of them (Sinkhorn-Knopp on exp(scores / ε), in the log domain:
    a small ε can't underflow)."""
    log_q = (scores / epsilon).T   # [K, B]
    codes, rows = log_q.shape
    log_shares = torch.full((codes, 1), -math.log(codes)) if shares is None else torch.log(shares.float())[:, None]
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) + log_shares.to(log_q)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(rows)
    return (log_q.exp() * rows).T


def shares_for(ratios: torch.Tensor, target: float) -> torch.Tensor:
    """The most even shares [K] of prompts over codes of MACs `ratios` [K] whose mean is `target`
    (maximum entropy: shares ∝ exp(β · ratio), β found by bisection)."""
    low, high = float(ratios.min()), float(ratios.max())
    if not low < target < high:
        raise ValueError(f"target must lie between the smallest and largest code's MACs ({low:.3f}, {high:.3f}), "
                         f"got {target}")
    spread = ratios.double() - ratios.double().mean()
    beta_low, beta_high = -1e3, 1e3
    for _ in range(200):
        beta = (beta_low + beta_high) / 2
        shares = torch.softmax(beta * spread / spread.abs().max(), 0)
        if float(shares @ ratios.double()) < target:
            beta_low = beta
        else:
            beta_high = beta
    return shares.float()


def gumbel_sigmoid(logits: torch.Tensor, temperature: float = 0.5, hard: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Gates in [0, 1] from logits with logistic noise; with `hard`, 0/1 forward and the soft gate's
    gradient backward (straight-through)."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    if not hard:
        return soft
    return (soft > 0.5).to(soft) + soft - soft.detach()




# -- training ------------------------------------------------------------------------------------------
def _picture_batches(pipe, prompts, images, generator):
    """``batch_of(count) -> (latents, prompts)``: `count` training pictures through the pipeline's VAE
    and their prompts, drawn from `prompts` and their `images` ([N, 3, H, W] in [-1, 1]) or from
    `images` itself when it is a callable ``(count, generator) -> (images, prompts)``."""
    if not callable(images):
        prompts = check_prompts(prompts, "prompts", (), allow_empty=True)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = getattr(images, "shape", type(images).__name__)
            raise ValueError(f"images must be a tensor [N, 3, H, W] in [-1, 1], got {got}")
        if len(images) != len(prompts):
            raise ValueError(f"images must hold one picture per prompt: {len(images)} pictures, {len(prompts)} prompts")
        if not torch.isfinite(images).all() or images.abs().max() > 1 + 1e-3:
            raise ValueError("images must be finite and in [-1, 1] (pictures as the VAE takes them)")
    vae = pipe.vae
    scaling = float(vae.config.get("scaling_factor", 1.0) or 1.0)

    def batch_of(count):
        if callable(images):
            pics, texts = images(count, generator)
        else:
            rows = torch.randint(0, len(prompts), (count,), generator=generator)
            pics, texts = images[rows], [prompts[i] for i in rows.tolist()]
        with torch.no_grad():
            latents = vae.encode(pics.to(vae.dtype)).latent_dist.mode().float() * scaling
        return latents, list(texts)

    return batch_of


def _prompts_of(prompts, images) -> str:
    """What the manifest says of the training prompts: their hash, or "drawn"."""
    return "drawn" if callable(images) else prompts_hash(prompts)


def _check_loop(batch: int, prompt_rows: int, iterations: int | None, lr: float, uncond_share: float) -> None:
    """A training loop's batch, rows per prompt (dividing the batch), step cap, learning rate and
    share of unconditional rows, checked by name."""
    check_number(lr, "lr", 0.0, low_open=True)
    check_number(uncond_share, "uncond_share", 0.0, 1.0, high_open=True)
    check_int(batch, "batch", 1, 1 << 16)
    check_int(prompt_rows, "prompt_rows", 1, 1024)
    if batch % prompt_rows:
        raise ValueError(f"prompt_rows must divide batch ({batch}), got {prompt_rows}")
    check_int(iterations, "iterations", 1, optional=True)


def _prompt_batch(adapter, pipe, batch_of, generator, batch, prompt_rows, uncond, uncond_share):
    """A training batch of `batch` rows, `batch / prompt_rows` prompts each `prompt_rows` times (other
    noises, other timesteps): noisy latents x, timesteps t, the prompts' embeddings with a share of
    rows made unconditional (CFG's, routed with their prompt) and the prompts' pooled embeddings."""
    latents, texts = batch_of(batch // prompt_rows)
    if prompt_rows > 1:
        latents, texts = latents.repeat_interleave(prompt_rows, 0), [p for p in texts for _ in range(prompt_rows)]
    x, t = _noisy(pipe.scheduler, latents, generator)
    with torch.no_grad():
        embeds = adapter.pipe.encode_prompt(texts, adapter.original.device, 1, False)[0].float()
        pooled = pooled_prompts(pipe, texts, embeds)   # read before some rows turn unconditional
        embeds[torch.rand(batch, generator=generator) < uncond_share] = uncond
    return x, t, embeds, pooled


def _noisy(scheduler, latents, generator):
    """(x_t, t): `latents` noised at uniform random training timesteps."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    return scheduler.add_noise(latents, noise, t), t


def _features(unet):
    """Hooks recording each up block's output (the block features distilled), and their remover."""
    store, handles = [], []
    for block in unet.up_blocks:
        handles.append(block.register_forward_hook(lambda m, a, out: store.append(out)))
    return store, handles


def code_targets(target: float, codes: int, spread: float) -> torch.Tensor:
    """Each code's own share of the full model's MACs: evenly spaced over target · (1 ± spread), their
    mean the target (the spread narrowed where the largest would pass the full model)."""
    if codes == 1:
        return torch.tensor([target])
    spread = min(spread, 1 / target - 1)
    return target * (1 + spread * torch.linspace(-1, 1, codes))


@torch.no_grad()
def _plan_by_need(unet, gates_hooks, code_logits, x, t, embeds, target_out, epsilon: float = 0.1,
                  prompt_rows: int = 1):
    """A balanced assignment of rows to codes [B, K] by need: each row's distillation loss under every
    code's current architecture (one batched call), then Sinkhorn on its logarithm, centred per row.
    The log makes it a ratio, how many times worse a row gets from one code to another, so that rows
    at low noise (whose losses are on another scale) don't outvote the rest, and it is the same for
    every prediction type (ε, v, x0 differ per row by a factor only). The rows that lose most in the
    small codes get the big ones. With `prompt_rows` > 1 the batch holds each prompt that many
    times in a run (other noise, other timesteps) and all its rows take one code, as they do when
    routed; a prompt's need is then its rows' mean loss itself, not its logarithm: the timesteps
    are drawn apart from the prompt, so their scale is noise in that mean, not a bias, and what a
    prompt loses in absolute terms is what its pictures show (on the shapes world three objects
    lose about twice what one does in a small code, a ratio only a little more)."""
    codes, rows = len(code_logits), len(x)
    current = keep_one((code_logits > 0).float(), gates_hooks.units, code_logits)
    gates_hooks.set(current.repeat_interleave(rows, 0))   # code-major, like the repeats below
    outs = unet(x.repeat(codes, 1, 1, 1), t.repeat(codes), embeds.repeat(codes, 1, 1), return_dict=False)[0]
    cost = (outs - target_out.repeat(codes, 1, 1, 1)).pow(2).flatten(1).mean(-1).view(codes, rows).T
    return _plan_of_costs(cost, epsilon, prompt_rows)


def _plan_of_costs(cost: torch.Tensor, epsilon: float = 0.1, prompt_rows: int = 1,
                   shares: torch.Tensor | None = None) -> torch.Tensor:
    """The balanced plan [B, K] of each row's distillation loss under each code `cost` [B, K] (see
    :func:`_plan_by_need`), each code taking `shares` of the rows (default equal ones)."""
    rows, codes = cost.shape
    if prompt_rows > 1:
        need = cost.view(rows // prompt_rows, prompt_rows, codes).mean(1)
    else:
        need = torch.log(cost + 0.01 * cost.mean() + 1e-12)   # losses far below the batch's count as equal
    centred = need - need.mean(-1, keepdim=True)
    plan = sinkhorn(-centred / (centred.abs().mean() + 1e-12), epsilon=epsilon, iterations=200, shares=shares)
    return plan.repeat_interleave(prompt_rows, 0)


def sized_gates(logits: torch.Tensor, size: float, units: list[Unit], total: float, per_entry: torch.Tensor,
                blocks: dict) -> torch.Tensor:
    """One code's binary architecture: its gate logits [G] thresholded at the lowest level whose network
    costs at most `size` of the full model's MACs (at least one entry kept per width unit). The
    logits rank the gates; the threshold holds the code to its size, where a fixed one at 0 would
    leave it wherever training stopped."""
    for threshold in torch.unique(logits):   # ascending: the first fitting one keeps the most
        gates = keep_one((logits >= threshold).float(), units, logits)
        if float(macs_of(gates, units, total, per_entry, blocks)) <= size * total:
            return gates
    return gates


def train_router(pipe, prompts, images, codes: int = 4, target: float = 0.6, minutes: float = 40.0, *,
                 spread: float = 0.15, finetune_minutes: float | None = None, iterations: int | None = None,
                 batch: int = 32, lr: float = 1e-2, finetune_lr: float | None = None, finetune_rank: int = 8,
                 resource_weight: float = 1.0,
                 contrastive_weight: float = 0.5, balance_weight: float = 0.5, feature_weight: float = 0.5,
                 uncond_share: float = 0.3, by_need: bool = True, groups: int = GROUPS,
                 finetune: str | None = None, nested: bool = False, prompt_rows: int = 1, seed: int = 0,
                 progress=None) -> Router:
    """Train a router of `codes` codes for `pipe` on `prompts` and their pictures `images` ([N, 3, H, W]
    in [-1, 1], one per prompt, or a callable ``(count, generator) -> (images, prompts)`` drawing fresh
    ones), aiming at `target` of the full model's MACs on average. `minutes` is the whole budget:
    routing first, then the sub-networks' fine-tuning (``finetune_minutes``, default a third).
    `spread` grades the codes' sizes around the target (0: APTP's one shared target); `by_need`
    balances the assignment on each row's loss under each code (False: on the router's scores).
    `groups`: the width groups per ResNet and feed-forward layer (:data:`.pruning.GROUPS`).
    `finetune`: each code's sub-network with an adapter of its own on its own prompts (``"per-code"``,
    the default without `nested`),
    or one adapter on the full network trained through every row's code (``"shared"``, needs a rank).
    `nested`: the codes rank the gates by one shared order (:class:`RouterHead`), so each smaller
    code's network lies inside the larger ones' and every prompt trains that order; fine-tuning
    is then shared (the default with it). `prompt_rows`: each routing batch holds `batch / prompt_rows` prompts, each at that
    many noises and timesteps, and the plan by need gives a prompt's rows one code, by their mean need."""
    check_int(codes, "codes", 1, 64)
    check_int(groups, "groups", 1, 64)
    _check_loop(batch, prompt_rows, iterations, lr, uncond_share)
    check_number(finetune_lr, "finetune_lr", 0.0, low_open=True, optional=True)
    for name, weight in (("resource_weight", resource_weight), ("contrastive_weight", contrastive_weight),
                         ("balance_weight", balance_weight), ("feature_weight", feature_weight)):
        check_number(weight, name, 0.0)
    check_number(target, "target", 0.0, 1.0, low_open=True)
    check_number(spread, "spread", 0.0, 1.0, high_open=True)
    check_int(finetune_rank, "finetune_rank", 0, 512)
    finetune = finetune or ("shared" if nested else "per-code")
    check_choice(finetune, "finetune", FINETUNES)
    if nested and finetune != "shared":
        raise ValueError("finetune: nested codes share one network; fine-tune it 'shared'")
    if finetune == "shared" and not finetune_rank:
        raise ValueError("finetune: 'shared' trains one low-rank adapter; give a finetune_rank > 0")
    finetune_lr = (1e-3 if finetune_rank else 1e-4) if finetune_lr is None else finetune_lr
    check_number(minutes, "minutes", 0.0, low_open=True)
    check_number(finetune_minutes, "finetune_minutes", 0.0, minutes, high_open=True, optional=True)
    adapter = denoiser_for(pipe)
    if adapter.family != "unet":
        raise ValueError(f"pipe: routed pruning is written for SD-family UNets, not {adapter.family!r}")
    start = time.time()
    finetune_minutes = minutes / 3 if finetune_minutes is None else finetune_minutes
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = copy.deepcopy(plain_base(adapter.original)).float().eval().requires_grad_(False)
    teacher = adapter.original
    units = prunable_units(unet, groups)
    G = gate_size(units)
    batch_of = _picture_batches(pipe, prompts, images, generator)
    sample_latents, sample_texts = batch_of(2)
    with torch.no_grad():
        embeds0 = adapter.pipe.encode_prompt(sample_texts, unet.device, 1, False)[0].float()
    total, per_entry, blocks = unit_macs(unet, units, (sample_latents, torch.tensor([500.0, 500.0]), embeds0))
    total, per_entry = total / 2, per_entry / 2
    blocks = {k: v / 2 for k, v in blocks.items()}
    text_dim = pooled_prompts(pipe, sample_texts[:1]).shape[-1]
    head = RouterHead(text_dim, G, codes, nested=nested)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    gates_hooks = attach_gates(unet, units)
    store, feature_handles = _features(unet)
    uncond = adapter.pipe.encode_prompt([""], unet.device, 1, False)[0].float()
    sizes = code_targets(target, codes, spread)
    history, step = [], 0
    route_deadline = start + max(0.0, minutes - finetune_minutes) * 60
    while time.time() < route_deadline and (iterations is None or step < iterations):
        x, t, embeds, pooled = _prompt_batch(adapter, pipe, batch_of, generator, batch, prompt_rows, uncond,
                                             uncond_share)
        code_logits = head.code_logits()
        with torch.no_grad():
            gates_hooks.set(None)
            store.clear()
            target_out = unet(x, t, embeds, return_dict=False)[0]   # the full model (a float copy of the teacher)
            target_features = [f.detach() for f in store]
            plan = None
            if by_need and codes > 1:
                plan = _plan_by_need(unet, gates_hooks, code_logits.detach(), x, t, embeds, target_out,
                                     prompt_rows=prompt_rows)
        scores = head.scores(pooled)
        assign = torch.softmax(scores / 0.1, dim=-1)
        if plan is None:   # APTP: the codes' own logits mixed by the router, balanced by Sinkhorn on its scores
            plan = sinkhorn(scores.detach())
            logits = assign @ code_logits
        else:              # each code's logits learn on the rows the plan gives it
            logits = F.one_hot(plan.argmax(-1), codes).to(code_logits) @ code_logits
        gates = gumbel_sigmoid(logits, generator=generator)
        gates_hooks.set(gates)
        store.clear()
        out = unet(x, t, embeds, return_dict=False)[0]
        distill = F.mse_loss(out, target_out)
        features = sum(F.mse_loss(f, g) for f, g in zip(store, target_features)) / max(len(store), 1)
        ratio = macs_of(torch.sigmoid(logits), units, total, per_entry, blocks) / total
        resource = (torch.log(ratio.mean() / target)).abs()
        if spread > 0:
            code_ratio = macs_of(torch.sigmoid(code_logits), units, total, per_entry, blocks) / total
            resource = resource + torch.log(code_ratio / sizes).abs().mean()
        prompt_sim = F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).T
        arch = F.normalize(assign @ torch.sigmoid(code_logits), dim=-1)   # the router's architecture per prompt
        contrastive = F.kl_div(F.log_softmax(arch @ arch.T / 0.1, dim=-1), F.softmax(prompt_sim / 0.1, dim=-1),
                               reduction="batchmean")
        balance = -(plan * torch.log(assign + 1e-8)).sum(-1).mean()
        loss = (distill + feature_weight * features + resource_weight * resource + contrastive_weight * contrastive
                + balance_weight * balance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        _logged(history, progress, {"stage": "route", "step": step, "loss": loss.item(), "distill": distill.item(),
                                    "macs_ratio": ratio.mean().item(),
                                    "used_codes": int(assign.argmax(-1).unique().numel())})
    gates_hooks.remove()
    for handle in feature_handles:
        handle.remove()
    with torch.no_grad():
        hard = torch.stack([sized_gates(head.code_logits()[k], float(sizes[k]), units, total, per_entry, blocks)
                            for k in range(codes)])
    base = plain_base(adapter.original)
    macs = [float(macs_of(hard[k], units, total, per_entry, blocks)) for k in range(codes)]
    tuning = (teacher, adapter, pipe, batch_of, generator, batch, finetune_lr, start + minutes * 60,
              history, progress, uncond, uncond_share, iterations)
    if finetune == "shared":
        from .onestep import add_lora

        add_lora(unet, finetune_rank)
        trained = {"shared": unet}
        _finetune_shared(unet, units, hard, head, *tuning)
    else:
        trained = {k: prune(copy.deepcopy(base).float(), units, hard[k]) for k in range(codes)}
        if finetune_rank:
            from .onestep import add_lora

            for module in trained.values():
                add_lora(module, finetune_rank)   # on the one-step adapter's layers
        _finetune(trained, head, *tuning)
    adapters = {}
    if finetune_rank:
        from peft.utils import get_peft_model_state_dict

        with torch.no_grad():   # stored in half precision: round them first, so the merged network is the loaded one
            for m in trained.values():
                for name, p in m.named_parameters():
                    if "lora_" in name:
                        p.copy_(p.half().float())
        adapters = {k: {n: v.detach().half() for n, v in get_peft_model_state_dict(m).items()}
                    for k, m in trained.items()}
        trained = {k: merge_lora(m) for k, m in trained.items()}
    subnets = {k: prune(trained["shared"], units, hard[k]) for k in range(codes)} if finetune == "shared" else trained
    for k, module in subnets.items():
        subnets[k] = placed_like(module, base).eval().requires_grad_(False)
    fields = {"base": model_hash(base), "family": adapter.family, "text_encoder": model_hash(pipe.text_encoder),
              "codes": codes, "target": target, "spread": spread, "units": len(units), "groups": groups}
    details = {"macs_per_code": macs, "macs_full": total, "macs_ratio_per_code": [m / total for m in macs],
               "route_steps": step, "history": history[-50:], "seconds": round(time.time() - start, 1),
               "prompts": _prompts_of(prompts, images), "seed": seed, "nested": nested,
               "prompt_rows": prompt_rows}
    return Router(head.eval(), units, hard, subnets, fields, details, adapters, finetune_rank, finetune)


def _teacher_batch(head, teacher, adapter, pipe, batch_of, generator, batch, uncond, uncond_share):
    """A fine-tuning batch: noisy latents, timesteps, prompt embeddings (a share unconditional), each
    row's code and the full model's output."""
    x, t, embeds, pooled = _prompt_batch(adapter, pipe, batch_of, generator, batch, 1, uncond, uncond_share)
    with torch.no_grad():
        routes = head.scores(pooled).argmax(-1)
        target = teacher(x.to(teacher.dtype), t, embeds.to(teacher.dtype), return_dict=False)[0].float()
    return x, t, embeds, routes, target


def _logged(history, progress, entry: dict) -> None:
    """A training step's entry kept in `history`, and shown every tenth step (and the first)."""
    history.append(entry)
    if progress and (entry["step"] % 10 == 0 or entry["step"] == 1):
        progress(entry)


def _finetune(subnets, head, teacher, adapter, pipe, batch_of, generator, batch, lr, deadline, history,
              progress, uncond, uncond_share, iterations):
    """Each sub-network trained on the prompts routed to it, the full model as teacher, in turns."""
    for module in subnets.values():
        module.train()
        if not any(p.requires_grad for p in module.parameters()):   # no adapter: every weight trains
            module.requires_grad_(True)
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
                  for k, m in subnets.items()}
    step = 0
    while time.time() < deadline and (iterations is None or step < iterations):
        x, t, embeds, routes, target = _teacher_batch(head, teacher, adapter, pipe, batch_of, generator,
                                                      batch, uncond, uncond_share)
        losses = {}
        for k in routes.unique().tolist():
            rows = routes == k
            out = subnets[k](x[rows], t[rows], embeds[rows], return_dict=False)[0]
            loss = F.mse_loss(out, target[rows])
            optimizers[k].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[k].step()
            losses[k] = loss.item()
        step += 1
        _logged(history, progress, {"stage": "finetune", "step": step, "losses": losses})


def _finetune_shared(unet, units, hard, head, teacher, adapter, pipe, batch_of, generator, batch, lr,
                     deadline, history, progress, uncond, uncond_share, iterations):
    """One adapter on the full network, each row run through its code's gates (`hard` [K, G]): every
    code's sub-network is that network pruned, so a weight that several codes keep learns from all
    their prompts, and each step is one call over the whole batch."""
    unet.train()
    gates = attach_gates(unet, units)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    step = 0
    while time.time() < deadline and (iterations is None or step < iterations):
        x, t, embeds, routes, target = _teacher_batch(head, teacher, adapter, pipe, batch_of, generator,
                                                      batch, uncond, uncond_share)
        gates.set(hard[routes])
        per_row = (unet(x, t, embeds, return_dict=False)[0] - target).pow(2).flatten(1).mean(1)
        optimizer.zero_grad(set_to_none=True)
        per_row.mean().backward()
        optimizer.step()
        step += 1
        _logged(history, progress, {"stage": "finetune", "step": step,
                                    "losses": {k: per_row[routes == k].mean().item() for k in routes.unique().tolist()}})
    gates.remove()
    unet.eval()


def join_routers(pipe, routers, prompts, images, minutes: float = 2.0, *, target: float | None = None,
                 iterations: int | None = None, batch: int = 32, prompt_rows: int = 4, lr: float = 1e-2,
                 uncond_share: float = 0.3, seed: int = 0, progress=None) -> Router:
    """One router over the codes of `routers` (folders or routers of `pipe`, e.g. single
    pruned models trained apart at different sizes, each with the whole data and its own ranking of
    the gates), with a new head trained by need for `minutes`: each prompt's distillation loss on
    every code, balanced by Sinkhorn so that every code serves an equal share of the training
    prompts, or (`target`, a share of the full model's MACs between the smallest code's and the
    largest's) the most even shares whose mean MACs are `target` (:func:`shares_for`). `prompts` /
    `images` as for :func:`train_router`. The members' sub-networks are taken as they are, not
    trained further."""
    if isinstance(routers, (str, os.PathLike, Router)) or len(routers) < 2:
        raise ValueError("routers: give two or more routers to join")
    check_number(minutes, "minutes", 0.0, low_open=True)
    _check_loop(batch, prompt_rows, iterations, lr, uncond_share)
    members = []
    for router in routers:
        try:
            members.append(load_router(router, pipe))
        except (ValueError, StaleArtefactError) as error:   # missing, or made for another model: named as this argument's
            raise type(error)(f"routers: {error}") from None
    first = members[0]
    for name, member in zip(routers, members):
        if member.finetune != "per-code" or member.rank != first.rank or member.units != first.units:
            raise ValueError(f"routers: {name if isinstance(name, (str, os.PathLike)) else 'a router'} can't be "
                             "joined: members need the same units and fine-tuning rank, each code fine-tuned on "
                             "its own (not --finetune shared)")
    start = time.time()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    subnets = [m.subnets[k] for m in members for k in range(m.codes)]
    gates = torch.cat([m.gates for m in members])
    adapter, batch_of = denoiser_for(pipe), _picture_batches(pipe, prompts, images, generator)
    uncond = adapter.pipe.encode_prompt([""], adapter.original.device, 1, False)[0].float()
    head = RouterHead(pooled_prompts(pipe, [""]).shape[-1], gate_size(first.units), len(subnets))
    optimizer = torch.optim.Adam([*head.net.parameters(), head.directions], lr=lr)   # the codes' gates are fixed
    macs, total = [d for m in members for d in m.details["macs_per_code"]], first.details["macs_full"]
    ratios = torch.tensor(macs) / total
    shares = None if target is None else shares_for(ratios, check_number(target, "target", 0.0, 1.0, low_open=True))
    history, step, deadline = [], 0, start + minutes * 60
    while time.time() < deadline and (iterations is None or step < iterations):
        x, t, embeds, pooled = _prompt_batch(adapter, pipe, batch_of, generator, batch, prompt_rows, uncond,
                                             uncond_share)
        with torch.no_grad():
            outs = [m(x.to(m.dtype), t, embeds.to(m.dtype), return_dict=False)[0].float()
                    for m in [adapter.original, *subnets]]
            cost = torch.stack([(o - outs[0]).pow(2).flatten(1).mean(-1) for o in outs[1:]], dim=-1)
            plan = _plan_of_costs(cost, prompt_rows=prompt_rows, shares=shares)
        assign = torch.softmax(head.scores(pooled) / 0.1, dim=-1)
        loss = -(plan * torch.log(assign + 1e-8)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        chosen = assign.argmax(-1)
        _logged(history, progress, {"stage": "route", "step": step, "loss": loss.item(), "distill": cost.mean().item(),
                                    "macs_ratio": ratios[chosen].mean().item(), "used_codes": int(chosen.unique().numel())})
    aimed = float(ratios.mean()) if shares is None else float(shares @ ratios)
    fields = {**first.fields, "codes": len(subnets), "target": round(aimed, 4), "spread": 0.0}
    details = {"macs_per_code": macs, "macs_full": total, "macs_ratio_per_code": ratios.tolist(),
               "route_steps": step, "history": history[-50:], "prompts": _prompts_of(prompts, images), "seed": seed,
               "nested": False, "prompt_rows": prompt_rows, "joined": [m.details.get("seconds") for m in members],
               "seconds": round(time.time() - start + sum(m.details.get("seconds", 0) for m in members), 1)}
    adapters = {}
    if first.rank:
        adapters = {i: a for i, a in enumerate(a for m in members for _, a in sorted(m.adapters.items()))}
    return Router(head.eval(), first.units, gates, dict(enumerate(subnets)), fields, details, adapters, first.rank)


@torch.no_grad()
def calibrate_router(pipe, router, prompts, target: float) -> Router:
    """`router` (a folder or a router of `pipe`) with each code's score shifted so that `prompts` — a
    sample of what it will serve — are routed at `target` of the full model's MACs on average, as
    near as their count allows. A router balanced on its training prompts serves another mix at
    other MACs (the shapes world's training stream is mostly one object, its held-out mix one, two
    and three in equal shares). The shift is λ times each code's share of the MACs: raising λ moves
    prompts only towards bigger codes, so the mean is monotone in λ and a bisection finds it, and
    the prompts that need most stay on the biggest codes. The result's manifest records the target,
    where the prompts landed and their hash."""
    loaded = load_router(router, pipe)
    if isinstance(prompts, str) or not len(prompts) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: a non-empty list of strings, a sample of what the router will serve")
    prompts = list(prompts)
    ratios = torch.tensor(loaded.details["macs_per_code"], dtype=torch.float64) / loaded.details["macs_full"]
    if ratios.max() == ratios.min():
        raise ValueError("router: its codes all cost the same (or it has one); there is nothing to calibrate")
    check_number(target, "target", float(ratios.min()), float(ratios.max()))
    head = copy.deepcopy(loaded.head)
    head.offsets.zero_()
    scores = torch.cat([head.scores(pooled_prompts(pipe, prompts[i:i + 256]))
                        for i in range(0, len(prompts), 256)]).double()

    def landed(shift: float) -> float:
        return float(ratios[(scores + shift * ratios).argmax(-1)].mean())

    gaps = (ratios[:, None] - ratios[None]).abs()
    reach = 2.0 / float(gaps[gaps > 0].min()) + 1.0   # cosines differ by ≤ 2: beyond it one code takes all
    low, high = -reach, reach
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if landed(middle) < target else (low, middle)
    edge, end = (low, -reach) if abs(landed(low) - target) <= abs(landed(high) - target) else (high, reach)
    level, inner = landed(edge), edge
    for _ in range(60):   # the far end of edge's step: the shift goes in its middle, clear of both ends' ties
        middle = (inner + end) / 2
        inner, end = (middle, end) if landed(middle) == level else (inner, middle)
    shift = (edge + inner) / 2
    head.offsets.copy_((shift * ratios).float())
    calibration = {"target": round(float(target), 4), "landed": round(landed(shift), 4),
                   "prompts": prompts_hash(prompts), "count": len(prompts)}
    return dataclasses.replace(loaded, head=head.eval(), fields={**loaded.fields, "target": round(float(target), 4)},
                               details={**loaded.details, "calibration": calibration})
