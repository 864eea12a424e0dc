"""What every ControlNet adapter holds, whatever its family (the UNets' in :mod:`fastdiff.controlnet`,
SD3's and FLUX.1's in :mod:`fastdiff.sd3_controlnet` and :mod:`fastdiff.flux_controlnet`): its nets,
each condition's scale, the steps each acts on, and what the front doors ask of it."""

from __future__ import annotations

import abc

import torch

from .denoiser import Conditioning, Denoiser, DenoiserAround, GraphSpec


def controlnets_of(controlnet) -> list:
    """The ControlNets a pipeline's ``controlnet`` holds (diffusers' MultiControlNetModel: several)."""
    nets = getattr(controlnet, "nets", None)
    return list(nets) if nets is not None else [controlnet]


class ControlNetsAround(DenoiserAround):
    """What every ControlNet adapter holds: its nets, each one's conditioning scale and the steps it
    acts on (a call's ``control_guidance_start`` / ``end``). A call whose rows are at steps where
    different nets act runs each step's rows alone. Each family's adapter makes its own call
    (:meth:`run_nets`), lays out its rows (:meth:`with_pictures`) and describes its nets' graphs
    (:meth:`net_graph_spec`)."""

    # SD3's and FLUX.1's pipelines draw their control pictures at the native size unless given (the
    # UNets' keep a picture's own)
    pictures_at_native_size = False
    global_pool = False   # nets trained on pooled conditions (some of the UNets'), always in guess mode
    streams = False       # whether a Stream runs these nets (each frame's control image with it)

    def __init__(self, base: Denoiser, nets: list):
        super().__init__(base)
        self.nets = list(nets)
        self.net_names = [f"controlnet/{k}" for k in range(len(self.nets))]
        self.guess_mode = False
        self._scales = [1.0] * len(self.nets)   # each net's conditioning scale
        self._keep = None                       # {timestep: [0/1 per net]}: the steps each net acts on
        self._modes = None                      # a Union net's kind of control per condition

    def set_scales(self, scales, keep: dict | None = None, guess_mode: bool = False, modes: list | None = None):
        """Each condition's (net's) conditioning scale; `keep` {timestep: [1 or 0 per net]} the steps
        each acts on (None: all); guess mode as diffusers' (the ControlNets read no prompt's meaning:
        the residuals are scaled up block by block, and the unconditional rows get none); `modes` a
        Union net's kind of control per condition (FLUX.1's rows carry theirs)."""
        self._scales, self._keep, self.guess_mode = list(scales), keep, bool(guess_mode)
        self._modes = modes

    def run(self, module, latents, t, cond):
        keep = self._keep_of(t)
        if keep is not None:
            return self.run_nets(module, latents, t, cond, keep)
        out = None   # the nets act on some of these rows' steps and not others': each step alone
        for step in t.unique():
            rows = (t == step).nonzero().squeeze(1)
            part = self.run(module, latents[rows], t[rows], cond.rows(rows))
            out = part.new_empty((latents.shape[0],) + tuple(part.shape[1:])) if out is None else out
            out[rows] = part
        return out

    @abc.abstractmethod
    def run_nets(self, module, latents, t, cond, keep: list):
        """The denoiser's call on rows all at steps where the nets `keep` (1.0 or 0.0 each) act."""

    @abc.abstractmethod
    def with_pictures(self, cond: Conditioning, uncond: Conditioning, pictures: list, control, *, codec, generator,
                      guided: bool, embedded_guidance) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond), each row carrying what the nets read of a call's control `pictures` (one
        [B, 3, H, W] per condition, B the call's images, as the pipeline's image processor makes
        them) and of its other `control` inputs (:class:`fastdiff.control_inputs.ControlInputs`);
        `codec` and `generator` encode pictures the family's nets read as latents, as its pipeline
        draws them; `guided`: the pipeline guides over unconditional rows (guidance_scale > 1);
        `embedded_guidance` a guidance-distilled model's input."""

    def check_modes(self, mode, conditions: int) -> list | None:
        """Each condition's kind of control, where the nets take one (Union nets)."""
        return None

    def condition_count(self, control_image, given: dict) -> int:
        """How many control conditions a call's `control_image` holds (its other control arguments
        `given`): one per net."""
        return len(self.nets)

    def side_networks(self) -> dict:
        return dict(zip(self.net_names, self.nets))

    def side_graph_spec(self, name):
        net = self.side_networks().get(name)
        return super().side_graph_spec(name) if net is None else self.net_graph_spec(net)

    @abc.abstractmethod
    def net_graph_spec(self, net) -> GraphSpec:
        """One of the nets as exporters see it (its engine's inputs, outputs and call)."""

    def _keep_of(self, t: torch.Tensor) -> list | None:
        """Which nets act on rows at timesteps `t` (1.0 or 0.0 per net), or None where that differs
        between the rows' steps. Without a call's step ranges (a stream), every net acts on every row,
        as at a timestep the ranges don't name (a cost count's probe)."""
        everywhere = [1.0] * len(self._scales)
        if self._keep is None:
            return everywhere
        keeps = {tuple(self._keep.get(float(step), everywhere)) for step in t.unique().tolist()}
        return list(keeps.pop()) if len(keeps) == 1 else None
