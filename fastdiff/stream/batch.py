"""Stream batching over latents: every denoising step of several frames in one denoiser call.

The stream holds n slots of F frames. Slot i is at the stream's timestep τ_i; a new group of F
frames enters slot 0 and, one call later, moves to slot 1, and so on; a group leaves finished
after slot n−1. Each call therefore carries n·F rows (fewer while the stream fills or drains: only
slots holding frames are computed) and returns the group that entered n−1 calls before, with the
tag it entered with.

Rows are slot-major: rows [i·F, (i+1)·F) are slot i's frames. The step itself — guidance, solver,
residuals — is :func:`fastdiff.sampling.step.stream_step`; this module keeps only the slots, their
noise and the shift by F rows (a whole slot) per call, whatever n and F are.

With ``packed=True``, once the stream is full and runs on its fixed noise, the slots live packed in
two buffers that the calls alternate between (:class:`_Packed`): each call's step writes its rows one
slot further down the other buffer, where the next call reads them, so a frame has no
concatenation, no split and no per-slot bookkeeping. The finished group's latents are then rows of
those buffers, written again two calls later: for a caller that uses them at once (``fastdiff.Stream``
decodes them). Anything else that looks at the slots unpacks them first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_choice
from ..denoiser import Conditioning, Denoiser
from ..sampling.guiders import Guider
from ..sampling.schedule import StepSchedule
from ..sampling.step import StepRows, carries_state, step_rows, stream_step

NOISE_MODES = ("fixed", "fresh")


@dataclass
class Finished:
    """A group of F frames that left the stream: its latents and the tag it entered with."""

    latents: torch.Tensor
    tag: Any = None


@dataclass
class _Slot:
    latents: torch.Tensor
    residual: torch.Tensor | None
    tag: Any
    extras: dict | None = None   # conditioning that travels with the group (a ControlNet's images)


@dataclass
class _Packed:
    """The full stream's rows in two buffers of R + F rows (R = n·F): in the current one, rows [0, F)
    are the group entering (for txt2img its fixed start, written once), [F, R) the groups in
    flight; a call's step writes its R rows to the other buffer from row F on, so that its rows
    [F, R) are the next call's groups in flight and [R, R + F) the group leaving."""

    latents: tuple
    residuals: tuple | None
    tags: list        # the tags of slots 1..n−1, in order
    F: int
    R: int
    current: int = 0


@dataclass
class _Call:
    """What one call's rows need that depends only on which slots hold frames (cached)."""

    slots: tuple
    rows: StepRows
    noise_index: Any   # where the noisy rows' fixed noise lies in noise.flatten(0, 1): a slice or an index
    noise: torch.Tensor | None = None   # those rows, once looked up


class LatentStream:
    """The batched denoising core. `push` a group of F frames, get back the finished group.

    Output lags input by n−1 calls: `push` returns None until the stream is full, and `drain`
    returns the groups still in flight.

    ``noise="fixed"`` draws each slot's noise ε_i once (what enters slot 0, what re-noises into
    slot i; :meth:`_fixed_noise`) and keeps it, which keeps video temporally stable; ``"fresh"`` draws, for every call,
    exactly the noise that call uses, in row order — as a diffusers pipeline draws it, one step at
    a time, when the stream runs a single group (:func:`fastdiff.accelerate`).
    """

    def __init__(self, denoiser: Denoiser, schedule: StepSchedule, cond: Conditioning,
                 uncond: Conditioning | None, latent_shape: tuple[int, int, int], *, guider: Guider,
                 noise: str = "fixed", generator: torch.Generator | None = None, folded: bool = True,
                 packed: bool = False):
        if not isinstance(guider, Guider):
            raise ValueError(f"guider must be a fastdiff.sampling.guiders.Guider, got {type(guider).__name__}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.noise_mode = check_choice(noise, "noise", NOISE_MODES)
        self.latent_shape = tuple(latent_shape)
        self.generator = generator
        self.folded = folded
        self.packs = packed   # whether a full stream packs its slots (see the module's docstring)
        self.device, self.dtype = denoiser.device, denoiser.dtype
        self.guider = guider
        self.set_conditioning(cond, uncond)
        self._packed: _Packed | None = None
        self._all_occupied = tuple(range(self.n - 1))   # the full stream's call key
        self.slots: list[_Slot | None] = [None] * (self.n - 1)   # slot j+1's frames, in flight
        self.noise = None   # fixed noise [n + 1, F, C, h, w] (see _fixed_noise)
        self._entry_terms = None   # see _entry

    # -- configuration -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.schedule)

    @property
    def carries(self) -> bool:
        """Whether each row carries a state from call to call (residual guidance's S, or the
        multistep solver's last x̂0), kept beside its latents."""
        return carries_state(self.guider, self.schedule.solver)

    @property
    def frames(self) -> int:
        return len(self.cond)

    @property
    def rows_per_call(self) -> int:
        """Model rows of a call on a full stream."""
        rows = self.n * self.frames
        return self.guider.model_rows(rows, self.frames)

    @property
    def in_flight(self) -> int:
        """Groups of frames inside the stream, waiting for their remaining steps."""
        if self._packed is not None:
            return self.n - 1
        return sum(slot is not None for slot in self._slots)

    @property
    def slots(self) -> list:
        """Slot j+1's group (None: empty), j < n − 1; unpacked from the buffers if need be."""
        if self._packed is not None:
            self._unpack()
        return self._slots

    @slots.setter
    def slots(self, slots: list):
        self._packed = None
        self._slots = slots

    def set_conditioning(self, cond: Conditioning, uncond: Conditioning | None):
        """New prompt embeddings, used from the next call on by the frames in flight too."""
        if self.guider.needs_uncond and uncond is None:
            raise ValueError(f"cfg={self.guider.mode!r} needs unconditional embeddings")
        if uncond is not None and len(uncond) != len(cond):
            raise ValueError(f"uncond has {len(uncond)} rows, cond has {len(cond)}")
        self.cond = cond.to(self.device, self.dtype)
        self.uncond = uncond.to(self.device, self.dtype) if uncond is not None else None
        self._calls: dict = {}

    def set_guider(self, guider: Guider):
        """Another guidance mode or scale, from the next call on (the frames in flight too)."""
        if guider.needs_uncond and self.uncond is None:
            raise ValueError(f"cfg={guider.mode!r} needs unconditional embeddings")
        if carries_state(guider, self.schedule.solver) != self.carries and self.in_flight:
            raise ValueError("a change between residual and non-residual guidance needs an empty stream")
        if self._packed is not None:   # packed again at the next push, with the buffers this guider needs
            self._unpack()
        self.guider = guider
        self._calls = {}

    def _call(self, new: bool, occupied: tuple) -> _Call:
        key = (new, occupied)
        if key not in self._calls:
            F, n = self.frames, self.n
            slots = ((0,) if new else ()) + tuple(j + 1 for j in occupied)
            steps = torch.tensor(slots).repeat_interleave(F)
            rows = step_rows(self.schedule, steps, self.cond.tile(len(slots)),
                             self.uncond.tile(len(slots)) if self.uncond is not None else None,
                             F if new else 0, self.guider, self.device, self.dtype, self.folded)
            # row r (slot s, frame f) takes the fixed noise of the slot it moves to: ε_{s+1}
            index = torch.tensor([(slots[r // F] + 1) * F + r % F for r in range(rows.noise_rows)], dtype=torch.long)
            if len(index) and bool((index.diff() == 1).all()):   # a view, not a gather: the full stream's case
                noise_index = slice(int(index[0]), int(index[-1]) + 1)
            else:
                noise_index = index.to(self.device)
            self._calls[key] = _Call(slots, rows, noise_index)
        return self._calls[key]

    # -- noise ---------------------------------------------------------------------------------
    def _draw(self, rows: int) -> torch.Tensor:
        gen_device = self.generator.device if self.generator is not None else "cpu"
        eps = torch.randn((rows,) + self.latent_shape, generator=self.generator, device=gen_device,
                          dtype=torch.float32)
        return eps.to(self.device, self.dtype)

    def _fixed_noise(self) -> torch.Tensor:
        """[n + 1, F, ...]: ε_0 enters slot 0, ε_i re-noises into slot i, ε_n the last step's (DDIM η)."""
        if self.noise is None:
            self.noise = self._draw((self.n + 1) * self.frames).view(self.n + 1, self.frames, *self.latent_shape)
        return self.noise

    def _renoise(self, call: _Call) -> torch.Tensor | None:
        """The fresh noise z of the rows whose step puts some back (LCM's re-noising, DDIM η, TCD)."""
        if not call.rows.noise_rows:
            return None
        if self.noise_mode == "fresh":
            return self._draw(call.rows.noise_rows)
        if call.noise is None:   # the fixed noise never changes: its rows are looked up once per call shape
            call.noise = self._fixed_noise().flatten(0, 1)[call.noise_index]
        return call.noise

    # -- the call ------------------------------------------------------------------------------
    def push(self, clean: torch.Tensor | None = None, noise: torch.Tensor | None = None, tag: Any = None,
             scale: float = 1.0, extras: dict | None = None, start: torch.Tensor | None = None):
        """Enter one group of F frames at τ_0; returns the :class:`Finished` group, or None.

        img2img: x = α_0·scale·clean + β_0·ε_0 (`scale`: a VAE's scaling factor, left to this op).
        txt2img (`clean` None): x = noise_scale·ε_0. ε_0 is the stream's own noise for slot 0 unless
        `noise` is given. `start`: latents already at τ_0's noise level, entering as they are (a
        trajectory continued; `noise`, if given, is ε_0). `tag` comes back out with the group's
        latents. `extras` ({name: [F, ...]}) join the conditioning of the group's rows at every step
        it takes — each frame's own control images, say, while the groups beside it have theirs
        (such a stream runs unpacked).
        """
        if extras is not None:
            for name, value in extras.items():
                if value.shape[0] != self.frames:
                    raise ValueError(f"extras[{name!r}] has {value.shape[0]} rows for {self.frames} frames")
        if clean is not None:
            shape = (self.frames,) + self.latent_shape
            if tuple(clean.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(clean.shape)}")
            if clean.dtype != self.dtype or clean.device != self.device:
                clean = clean.to(self.device, self.dtype)
        if start is not None:
            if tuple(start.shape) != (self.frames,) + self.latent_shape:
                raise ValueError(f"start must have shape {(self.frames,) + self.latent_shape}, got {tuple(start.shape)}")
            eps0 = torch.zeros_like(start) if noise is None else noise.to(self.device, self.dtype)
            return self._step(_Slot(start.to(self.device, self.dtype), eps0, tag, extras))
        if noise is None and self.noise_mode == "fixed":   # the steady case: one op per frame at most
            eps0, fixed_start, noise_term, a0 = self._entry()
            if extras is None and (self._packed is not None or (self.packs and self.full and self._pack())):
                return self._push_packed(clean, noise_term, a0 * scale, tag)
            x_new = fixed_start if clean is None else torch.add(noise_term, clean, alpha=a0 * scale)
        else:
            eps0 = self._draw(self.frames) if noise is None else noise.to(self.device, self.dtype)
            shape = (self.frames,) + self.latent_shape
            if tuple(eps0.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(eps0.shape)}")
            if clean is None:
                x_new = self.schedule.noise_scale * eps0
            else:
                a0, b0 = float(self.schedule.alpha[0]), float(self.schedule.beta[0])
                x_new = (a0 * scale) * clean + b0 * eps0
        return self._step(_Slot(x_new, eps0, tag, extras))

    def _entry(self):
        """(ε_0, noise_scale·ε_0, β_0·ε_0, α_0) of the fixed noise: what enters slot 0, computed once
        (each op between the model calls costs a frame far more than its arithmetic)."""
        if self._entry_terms is None:
            eps0 = self._fixed_noise()[0]
            self._entry_terms = (eps0, self.schedule.noise_scale * eps0, float(self.schedule.beta[0]) * eps0,
                                 float(self.schedule.alpha[0]))
        return self._entry_terms

    # -- the steady state, packed -----------------------------------------------------------------
    def _pack(self) -> bool:
        """Move the slots of a full stream into the two buffers; False where the step can't write
        into them (a step that is not folded: guidance rescale)."""
        if self._call(True, self._all_occupied).rows.folded is None or any(g.extras for g in self._slots):
            return False
        F, R = self.frames, self.n * self.frames
        eps0, start = self._entry()[:2]

        def buffers(head, rows):
            pair = tuple(torch.empty((R + F,) + self.latent_shape, device=self.device, dtype=self.dtype)
                         for _ in range(2))
            for buffer in pair:
                buffer[:F] = head
            for j, value in enumerate(rows):
                pair[0][F * (j + 1):F * (j + 2)] = value
            return pair
        groups = self._slots
        latents = buffers(start, [g.latents for g in groups])
        residuals = buffers(eps0, [g.residual for g in groups]) if self.carries else None
        self._packed = _Packed(latents, residuals, [g.tag for g in groups], F, R)
        return True

    def _unpack(self):
        """Back to one tensor per slot: views into the buffers, which no call writes again."""
        packed, F = self._packed, self.frames
        latents = packed.latents[packed.current]
        residuals = packed.residuals[packed.current] if packed.residuals is not None else None
        self._packed = None
        self._slots = [_Slot(latents[F * (j + 1):F * (j + 2)],
                             residuals[F * (j + 1):F * (j + 2)] if residuals is not None else None, tag)
                       for j, tag in enumerate(packed.tags)]

    def _push_packed(self, clean, noise_term, clean_weight: float, tag) -> Finished:
        packed = self._packed
        F, R, current, other = packed.F, packed.R, packed.current, 1 - packed.current
        x = packed.latents[current]
        if clean is not None:   # txt2img's entering rows hold its fixed start already
            torch.add(noise_term, clean, alpha=clean_weight, out=x[:F])
        residual = residual_out = None
        if packed.residuals is not None:
            residual, residual_out = packed.residuals[current][:R], packed.residuals[other][F:]
        call = self._call(True, self._all_occupied)   # cached: the key is built once
        out = packed.latents[other]
        stream_step(self.denoiser, x[:R], call.rows, residual, self.guider, self._renoise(call),
                    out=out[F:], residual_out=residual_out)
        packed.current = other
        if not packed.tags:   # one step: the group leaves as it entered
            return Finished(out[R:], tag)
        leaving = packed.tags.pop()
        packed.tags.insert(0, tag)
        return Finished(out[R:], leaving)

    # -- the steady state as one pure function (what a compiled whole step runs) ----------------
    @property
    def full(self) -> bool:
        return self._packed is not None or all(slot is not None for slot in self._slots)

    def steady_step(self):
        """The full stream's step as a pure function ``(x_new, eps_new, buffer, residual, cond) ->
        (finished latents, buffer', residual')`` over contiguous buffers (slots 1..n−1, slot-major),
        with the fixed noise and the per-row coefficients as constants and the model call's
        conditioning `cond` (:meth:`steady_conditioning`) an input: what
        ``fastdiff.Stream(compile="whole")`` compiles with its encode and decode. None when the stream
        is not in a steady state it can express (fresh noise)."""
        if self.noise_mode != "fixed" or self.n < 1:
            return None
        call = self._call(True, tuple(range(self.n - 1)))
        F, guider, denoiser, carried = self.frames, self.guider, self.denoiser, self.carries
        renoise = self._renoise(call)

        def step(x_new, eps_new, buffer, residual, cond):
            x = torch.cat([x_new, buffer]) if buffer is not None else x_new
            r = None
            if carried:
                r = torch.cat([eps_new, residual]) if residual is not None else eps_new
            x_next, r_next = stream_step(denoiser, x, call.rows, r, guider, renoise, cond)
            keep = x_next.shape[0] - F
            return x_next[keep:], (x_next[:keep] if keep else None), (r_next[:keep] if r_next is not None and keep
                                                                       else None)
        return step

    def steady_conditioning(self) -> Conditioning:
        """The model call's conditioning on the full stream, for the current prompt."""
        return self._call(True, tuple(range(self.n - 1))).rows.cond_model

    def state(self):
        """(buffer, residual) of the slots in flight, as the steady step takes them."""
        groups = self.slots
        if not groups:
            return None, None
        if len(groups) == 1:   # no copy for one slot in flight (two steps)
            return groups[0].latents, groups[0].residual if self.carries else None
        buffer = torch.cat([g.latents for g in groups])
        residual = torch.cat([g.residual for g in groups]) if self.carries else None
        return buffer, residual

    def shift_in(self, buffer, residual, tag):
        """Take back the state after a steady step that entered a group tagged `tag`; the tag of
        the group that left."""
        F = self.frames
        leaving = self.slots[-1].tag if self.slots else tag
        tags = [tag] + [slot.tag for slot in self.slots[:-1]]
        chunks = buffer.split(F) if buffer is not None else []
        r_chunks = residual.split(F) if residual is not None else [None] * len(chunks)
        self.slots = [_Slot(x, r, t) for x, r, t in zip(chunks, r_chunks, tags)]
        return leaving

    def drain(self) -> list[Finished]:
        """Run the frames in flight to the end (no new input); their groups, oldest first."""
        finished = []
        while self.in_flight:
            out = self.advance()
            if out is not None:
                finished.append(out)
        return finished

    def advance(self) -> Finished | None:
        """One call with no new input: the frames in flight one step on; the group that leaves, if any."""
        return self._step(None)

    def _step(self, new: _Slot | None) -> Finished | None:
        occupied = tuple(j for j, slot in enumerate(self.slots) if slot is not None)
        if new is None and not occupied:
            return None
        call = self._call(new is not None, occupied)
        groups = ([new] if new is not None else []) + [self.slots[j] for j in occupied]
        x = torch.cat([g.latents for g in groups]) if len(groups) > 1 else groups[0].latents
        residual = None
        if self.carries:
            residual = torch.cat([g.residual for g in groups]) if len(groups) > 1 else groups[0].residual
        cond = self._travelling(call, groups) if groups[0].extras is not None else None
        x_next, residual = stream_step(self.denoiser, x, call.rows, residual, self.guider, self._renoise(call), cond)
        return self._shift(call.slots, groups, x_next, residual)

    def _travelling(self, call: _Call, groups: list) -> Conditioning:
        """The call's model conditioning with each group's own extras in its rows (slot-major)."""
        if any(g.extras is None or g.extras.keys() != groups[0].extras.keys() for g in groups):
            raise ValueError("extras: every group in the stream must carry the same extras")
        rows = {k: torch.cat([g.extras[k] for g in groups]) for k in groups[0].extras}
        slots = len(call.slots)

        def joined(c):
            tiled = c.tile(slots)
            return Conditioning(tiled.embeds, {**tiled.extras, **rows}, tiled.route)
        uncond = joined(self.uncond) if self.uncond is not None else None
        # laid out as the guider lays the call's rows out (only its conditioning is taken here)
        return self.guider.model_conditioning(call.rows.t_model, joined(self.cond), uncond, call.rows.new)[1]

    def _shift(self, slots, groups, x_next, residual) -> Finished | None:
        """Slot i's rows move to slot i+1's place; slot n−1's rows leave finished."""
        F, n = self.frames, self.n
        self.slots = [None] * (n - 1)
        x_chunks = x_next.split(F)
        r_chunks = residual.split(F) if residual is not None else [None] * len(slots)
        finished = None
        for slot, group, xc, rc in zip(slots, groups, x_chunks, r_chunks):
            if slot == n - 1:
                finished = Finished(xc, group.tag)
            else:
                self.slots[slot] = _Slot(xc, rc, group.tag, group.extras)
        return finished
