"""Prunable units of a denoiser, gates on them, and physically pruned sub-networks.

The units are data, read off the module tree of a UNet2DConditionModel (no branches in a trainer):

- ``resnet``  — a ResNet block's hidden channels, in groups of whole GroupNorm groups;
- ``heads``   — an attention layer's heads (self- and cross-attention);
- ``ff``      — a feed-forward layer's hidden channels, in groups;
- ``depth``   — the last ResNet block and the last transformer of every stage, whole.

:func:`attach_gates` puts a gate on every unit through forward hooks (the model's code is not
touched): a width gate scales its channels where they enter the next layer (after the activation,
so a closed group contributes exactly nothing), a depth gate scales the block's residual branch.
Gates are per row, so one batch can run several architectures. :func:`prune` then builds the
sub-network of one binary gate vector with real, smaller weight tensors; it equals the gated full
network with those gates closed (a test checks it). :func:`unit_macs` gives each unit's MACs, read
once from the shared counter (:func:`fastdiff.macs.module_macs`), so the MACs of any gate vector
follow without running the network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

__all__ = ["Unit", "prunable_units", "Gates", "attach_gates", "prune", "unit_macs", "macs_of", "gate_size",
           "keep_one"]

# Width groups per ResNet block and per feed-forward layer: 4 keeps every pruned width of the shapes
# UNet a multiple of 16 channels, the block oneDNN computes in on AVX-512 CPUs (with 8, widths such
# as 24 or 56 paid for padding: a router at 42% fewer MACs ran 1.31x where 8 groups gave 1.15-1.17x).
GROUPS = 4


@dataclass(frozen=True)
class Unit:
    """One prunable unit: its kind, the module it gates, how many gate entries it has, and the
    depth unit (a block) it lies inside, if that block can go too."""

    kind: str        # "resnet", "heads", "ff" or "depth"
    module: str      # qualified name in the denoiser
    size: int        # gate entries: channel groups, heads, or 1 for depth
    inside: str | None = None


def _resnet_groups(resnet, groups: int) -> int:
    norm_groups = resnet.norm2.num_groups
    return max(g for g in range(1, groups + 1) if norm_groups % g == 0)


def prunable_units(unet: torch.nn.Module, groups: int = GROUPS) -> list[Unit]:
    """The units of a UNet2DConditionModel-like module tree, in module order; ResNet and
    feed-forward widths in at most `groups` groups (a ResNet's in whole GroupNorm groups)."""
    stages = [*getattr(unet, "down_blocks", []), *getattr(unet, "up_blocks", [])]
    names = {id(m): n for n, m in unet.named_modules()}
    deep = set()
    for stage in stages:   # the last ResNet and the last transformer of every stage may go whole
        for attr in ("resnets", "attentions"):
            modules = getattr(stage, attr, None)
            if modules:
                deep.add(names[id(modules[-1])])
    units, seen_depth = [], set()
    for name, module in unet.named_modules():
        kind = type(module).__name__
        owner = next((d for d in deep if name == d or name.startswith(d + ".")), None)
        if owner is not None and owner not in seen_depth:
            units.append(Unit("depth", owner, 1))
            seen_depth.add(owner)
        if kind == "ResnetBlock2D":
            units.append(Unit("resnet", name, _resnet_groups(module, groups), owner))
        elif kind == "Attention":
            units.append(Unit("heads", name, module.heads, owner))
        elif kind == "FeedForward" and type(module.net[0]).__name__ in ("GEGLU", "GELU"):
            units.append(Unit("ff", name, groups, owner))
    return units


def gate_size(units: list[Unit]) -> int:
    return sum(u.size for u in units)


def _slices(units):
    out, start = [], 0
    for u in units:
        out.append(slice(start, start + u.size))
        start += u.size
    return out


def keep_one(gates: torch.Tensor, units: list[Unit], logits: torch.Tensor | None = None) -> torch.Tensor:
    """Binary gates [..., G] with every width unit keeping at least one entry (the largest logit's)."""
    gates = gates.clone()
    ref = logits if logits is not None else torch.zeros_like(gates)
    for unit, part in zip(units, _slices(units)):
        if unit.kind == "depth":
            continue
        block = gates[..., part]
        empty = block.sum(-1) == 0
        if empty.any():
            best = ref[..., part].argmax(-1)
            block[empty] = torch.nn.functional.one_hot(best[empty], unit.size).to(block.dtype)
            gates[..., part] = block
    return gates


class Gates:
    """The gate values the hooks read: [B, G] (a row's architecture) or [G] (every row's), or None
    (all open). Set before a call with :meth:`set`; `units` say which entries gate what."""

    def __init__(self, units: list[Unit]):
        self.units, self.slices = units, _slices(units)
        self.values: torch.Tensor | None = None
        self.handles = []

    def set(self, values: torch.Tensor | None) -> None:
        self.values = values

    def _part(self, i: int, rows: int) -> torch.Tensor | None:
        if self.values is None:
            return None
        g = self.values[..., self.slices[i]]
        if g.dim() == 1:
            g = g.unsqueeze(0)
        if g.shape[0] not in (1, rows):   # classifier-free guidance doubles the rows: both halves alike
            g = g.repeat(rows // g.shape[0], 1)
        return g

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _expand(g: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, k] group gates → [B, channels] (each group a run of channels)."""
    return g.repeat_interleave(channels // g.shape[1], dim=1)


def attach_gates(unet: torch.nn.Module, units: list[Unit]) -> Gates:
    """Hooks that apply :class:`Gates` to `unet`'s units; ``gates.remove()`` takes them off."""
    gates = Gates(units)
    for i, unit in enumerate(units):
        module = unet.get_submodule(unit.module)
        if unit.kind == "resnet":
            def scale_conv2(mod, args, i=i):
                g = gates._part(i, args[0].shape[0])
                return None if g is None else (args[0] * _expand(g, args[0].shape[1])[:, :, None, None],) + args[1:]
            gates.handles.append(module.conv2.register_forward_pre_hook(scale_conv2))
        elif unit.kind == "heads":
            def scale_heads(mod, args, i=i):
                g = gates._part(i, args[0].shape[0])
                return None if g is None else (args[0] * _expand(g, args[0].shape[-1])[:, None, :],) + args[1:]
            gates.handles.append(module.to_out[0].register_forward_pre_hook(scale_heads))
        elif unit.kind == "ff":
            def scale_ff(mod, args, i=i):
                g = gates._part(i, args[0].shape[0])
                return None if g is None else (args[0] * _expand(g, args[0].shape[-1])[:, None, :],) + args[1:]
            gates.handles.append(module.net[2].register_forward_pre_hook(scale_ff))
        elif type(module).__name__ == "ResnetBlock2D":
            def scale_block(mod, args, kwargs, out, i=i):
                g = gates._part(i, out.shape[0])
                if g is None:
                    return None
                x = args[0] if args else kwargs["input_tensor"]
                shortcut = (mod.conv_shortcut(x) if mod.conv_shortcut is not None else x) / mod.output_scale_factor
                g = g.view(-1, 1, 1, 1)
                return g * out + (1 - g) * shortcut
            gates.handles.append(module.register_forward_hook(scale_block, with_kwargs=True))
        else:   # a transformer: its output is the input plus its branch
            def scale_transformer(mod, args, kwargs, out, i=i):
                x = args[0] if args else kwargs["hidden_states"]
                g = gates._part(i, x.shape[0])
                if g is None:
                    return None
                y = out[0] if isinstance(out, tuple) else out.sample
                gated = x + g.view(-1, 1, 1, 1) * (y - x)
                return (gated,) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=gated)
            gates.handles.append(module.register_forward_hook(scale_transformer, with_kwargs=True))
    return gates


# -- physical pruning --------------------------------------------------------------------------------
class _Shortcut(torch.nn.Module):
    """A ResNet block pruned whole: only its shortcut is left."""

    def __init__(self, resnet):
        super().__init__()
        self.conv_shortcut = resnet.conv_shortcut
        self.output_scale_factor = resnet.output_scale_factor

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        return x / self.output_scale_factor


class _Identity(torch.nn.Module):
    """A transformer pruned whole: the hidden states pass through."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


def _rows(linear: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[keep].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[keep].clone()
    return new.to(linear.weight.device)


def _cols(linear: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, keep].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new.to(linear.weight.device)


def _channels(gate: torch.Tensor, channels: int) -> torch.Tensor:
    return _expand(gate.view(1, -1), channels)[0].nonzero().squeeze(1)


def _prune_resnet(resnet, gate):
    keep = _channels(gate, resnet.conv1.out_channels)
    conv1, conv2 = resnet.conv1, resnet.conv2
    new1 = torch.nn.Conv2d(conv1.in_channels, len(keep), conv1.kernel_size, conv1.stride, conv1.padding)
    new1.weight.data, new1.bias.data = conv1.weight.data[keep].clone(), conv1.bias.data[keep].clone()
    new2 = torch.nn.Conv2d(len(keep), conv2.out_channels, conv2.kernel_size, conv2.stride, conv2.padding)
    new2.weight.data, new2.bias.data = conv2.weight.data[:, keep].clone(), conv2.bias.data.clone()
    per_group = resnet.norm2.num_channels // resnet.norm2.num_groups
    norm = torch.nn.GroupNorm(len(keep) // per_group, len(keep), eps=resnet.norm2.eps, affine=True)
    norm.weight.data, norm.bias.data = resnet.norm2.weight.data[keep].clone(), resnet.norm2.bias.data[keep].clone()
    resnet.conv1, resnet.conv2, resnet.norm2 = (m.to(conv1.weight.device) for m in (new1, new2, norm))
    if resnet.time_emb_proj is not None:
        resnet.time_emb_proj = _rows(resnet.time_emb_proj, keep)


def _prune_heads(attn, gate):
    head_dim = attn.to_q.out_features // attn.heads
    keep = _channels(gate, attn.to_q.out_features)
    attn.to_q, attn.to_k, attn.to_v = (_rows(m, keep) for m in (attn.to_q, attn.to_k, attn.to_v))
    attn.to_out[0] = _cols(attn.to_out[0], keep)
    attn.heads = int(gate.sum())
    attn.inner_dim = attn.heads * head_dim
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = attn.inner_dim


def _prune_ff(ff, gate):
    proj = ff.net[0].proj
    inner = ff.net[2].in_features
    keep = _channels(gate, inner)
    rows = keep if proj.out_features == inner else torch.cat([keep, keep + inner])   # GEGLU: value and gate halves
    ff.net[0].proj = _rows(proj, rows)
    ff.net[2] = _cols(ff.net[2], keep)


def prune(unet: torch.nn.Module, units: list[Unit], gates: torch.Tensor) -> torch.nn.Module:
    """A copy of `unet` with every closed gate of the binary vector `gates` [G] cut out: smaller
    weight tensors, blocks whose depth gate is closed replaced by their shortcut (or nothing)."""
    gates = keep_one(gates.detach().float().round().clamp(0, 1).cpu(), units)
    pruned = copy.deepcopy(unet)
    for unit, part in zip(units, _slices(units)):
        g = gates[part]
        if unit.kind != "depth":
            if unit.inside is not None and gates[_slices(units)[units.index(_depth(units, unit.inside))]].item() == 0:
                continue   # the whole block goes below
            if bool(g.all()):
                continue
            module = pruned.get_submodule(unit.module)
            {"resnet": _prune_resnet, "heads": _prune_heads, "ff": _prune_ff}[unit.kind](module, g)
    for unit, part in zip(units, _slices(units)):
        if unit.kind == "depth" and gates[part].item() == 0:
            parent_name, _, child = unit.module.rpartition(".")
            parent = pruned.get_submodule(parent_name)
            module = parent[int(child)] if child.isdigit() else getattr(parent, child)
            replacement = _Shortcut(module) if type(module).__name__ == "ResnetBlock2D" else _Identity()
            if child.isdigit():
                parent[int(child)] = replacement
            else:
                setattr(parent, child, replacement)
    return pruned


def _depth(units, name):
    return next(u for u in units if u.kind == "depth" and u.module == name)


# -- MACs ----------------------------------------------------------------------------------------------
def unit_macs(unet: torch.nn.Module, units: list[Unit], sample_inputs) -> tuple[float, torch.Tensor, dict]:
    """(MACs of one full call on `sample_inputs`, MACs per gate entry [G], MACs per depth block) —
    per entry: what closing it saves (width units are exactly linear in their channels and heads)."""
    from ..macs import module_macs

    total, per_module = module_macs(unet, *sample_inputs)
    per_entry = torch.zeros(gate_size(units), dtype=torch.float64)
    blocks = {}
    for unit, part in zip(units, _slices(units)):
        if unit.kind == "depth":
            shortcut = per_module.get(unit.module + ".conv_shortcut", 0.0)
            blocks[unit.module] = per_module.get(unit.module, 0.0) - shortcut
            per_entry[part] = 0.0
            continue
        if unit.kind == "resnet":
            cost = sum(per_module.get(f"{unit.module}.{m}", 0.0) for m in ("conv1", "conv2", "time_emb_proj"))
        elif unit.kind == "heads":
            cost = per_module.get(unit.module, 0.0)   # q, k, v, out and the attention itself: per head alike
        else:
            cost = per_module.get(unit.module, 0.0)
        per_entry[part] = cost / unit.size
    return total, per_entry, blocks


def macs_of(gates: torch.Tensor, units: list[Unit], total: float, per_entry: torch.Tensor, blocks: dict):
    """MACs of the architecture `gates` [..., G] (soft or binary): the full call's, less what each
    closed width entry saves, less what each closed block still costs. Differentiable."""
    per_entry = per_entry.to(gates)
    closed_width = (1 - gates) * per_entry
    macs = total - closed_width.sum(-1)
    for unit, part in zip(units, _slices(units)):
        if unit.kind != "depth":
            continue
        d = gates[..., part.start]
        inside = [p for u, p in zip(units, _slices(units)) if u.inside == unit.module and u.kind != "depth"]
        still = blocks[unit.module] - sum(closed_width[..., p].sum(-1) for p in inside)
        macs = macs - (1 - d) * still
    return macs
