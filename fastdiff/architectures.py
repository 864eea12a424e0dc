"""Diffusers pipelines built from configs with random weights, for tests and speed benchmarks.

Nothing here downloads: the CLIP tokenizer's vocabulary is written to a folder by
:func:`fastdiff.vocab.write_clip_vocab`, every model is built from its config. Random weights cost the same
time as trained ones, so the real architectures' configs serve the speed benchmarks.
"""

from __future__ import annotations

import inspect

import os
import tempfile
from typing import Callable, NamedTuple

import torch

from .vocab import DEFAULT_WORDS, write_clip_vocab

__all__ = [
    "tiny_clip_tokenizer", "tiny_vae",
    "tiny_sd_pipeline", "tiny_sdxl_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline",
    "sd15_pipeline", "sd_turbo_pipeline", "sdxl_pipeline", "sd3_pipeline",
    "architecture_denoiser", "ARCHITECTURES", "Architecture",
]

def tiny_clip_tokenizer(max_length: int = 77, words=DEFAULT_WORDS):
    from transformers import CLIPTokenizer

    folder = write_clip_vocab(tempfile.mkdtemp(prefix="fastdiff-vocab-"), words)
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


def _tiny_clip_text_encoder(vocab_size: int, hidden_size: int = 32, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection_dim or hidden_size,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def tiny_vae(kind: str = "kl", latent_channels: int = 4, **config):
    """A VAE with scale factor 8: ``"kl"`` (AutoencoderKL) or ``"tiny"`` (AutoencoderTiny).

    ``config`` goes to the constructor (e.g. ``scaling_factor``, ``shift_factor``).
    """
    from diffusers import AutoencoderKL, AutoencoderTiny

    if kind == "kl":
        return AutoencoderKL(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=latent_channels,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=64,
            **config,
        ).eval()
    if kind == "tiny":
        return AutoencoderTiny(
            encoder_block_out_channels=(16, 16, 16, 16),
            decoder_block_out_channels=(16, 16, 16, 16),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=latent_channels,
            **config,
        ).eval()
    raise ValueError(f"kind must be 'kl' or 'tiny', got {kind!r}")


def _sd_scheduler(name: str, prediction_type: str = "epsilon"):
    """The SD 1.x / SDXL noise schedule with a "ddim", "lcm", "tcd" or "euler" sampler."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    schedulers = {"ddim": DDIMScheduler, "lcm": LCMScheduler, "tcd": TCDScheduler, "euler": EulerDiscreteScheduler}
    if name not in schedulers:
        raise ValueError(f"scheduler must be one of {sorted(schedulers)}, got {name!r}")
    extra = {"clip_sample": False, "set_alpha_to_one": False} if name == "ddim" else {}
    return schedulers[name](
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, steps_offset=1, **extra,
    )


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim", vae: str = "kl", img2img: bool = False,
                     prediction_type: str = "epsilon", sample_size: int = 8, levels: int = 2):
    """A Stable-Diffusion-1.x-shaped pipeline small enough for CPU tests (64×64 images by default).

    ``scheduler``: "ddim", "lcm", "tcd" or "euler". ``vae``: "kl" or "tiny". ``levels``: 2, or 1 for a
    UNet of one cross-attention level (fewer kinds of kernel for a compiler to build).
    """
    if levels not in (1, 2):
        raise ValueError(f"levels must be 1 or 2, got {levels!r}")
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = _tiny_clip_text_encoder(len(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64) if levels == 2 else (16,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")[:levels],
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")[-levels:],
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=tiny_vae(vae), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_sd_scheduler(scheduler, prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)   # a test's or a benchmark's pipeline: no bars
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "ddim", vae: str = "kl", img2img: bool = False,
                       refiner: bool = False):
    """A Stable-Diffusion-XL-shaped pipeline small enough for CPU tests (64×64 images).

    Two text encoders (hidden 32 each, the second with a 32-wide projection), so the UNet sees
    64-wide cross-attention and 6 × 8 time-id features + 32 pooled ones. ``refiner``: shaped as
    SDXL's refiner (img2img, the second text encoder alone, an aesthetic score in place of the
    target size: 5 × 8 time-id features).
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = _tiny_clip_text_encoder(len(tokenizer), hidden_size=32)
    text_encoder_2 = _tiny_clip_text_encoder(len(tokenizer_2), hidden_size=32, projection_dim=32)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32 if refiner else 32 + 32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=(5 if refiner else 6) * time_embed_dim + 32,
        norm_num_groups=8,
    ).eval()
    components = dict(
        vae=tiny_vae(vae), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_sd_scheduler(scheduler), add_watermarker=False,
    )
    if refiner:
        components.update(text_encoder=None, tokenizer=None)
        return StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=True)
    if img2img:
        return StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False)
    return StableDiffusionXLPipeline(**components)


def tiny_controlnet_pipeline(family: str = "sd", img2img: bool = False, nets: int = 1, seed: int = 0,
                             scheduler: str = "ddim", reads: str = "latents", union: bool = False, wrap: bool = False,
                             zero_pooled: bool = True):
    """A tiny SD ("sd"), SDXL ("sdxl"), SD3 ("sd3") or FLUX.1 ("flux") ControlNet pipeline (64×64
    images), its nets' zero-initialised output layers drawn at random so that the control picture
    changes the image. SD's and SDXL's: nets made from the tiny UNet, `nets` > 1 a
    MultiControlNetModel; SDXL's `union` ones ControlNetUnionModels (ControlNet++), one picture of
    each kind of control. FLUX.1's (dev's kind): nets that read the control picture's latents
    (`reads` "latents", InstantX's kind) or its pixels ("pixels", XLabs'), `union` ones with modes;
    `wrap` holds even one net in a multi wrapper. SD3's (txt2img): InstantX's kind (`zero_pooled`:
    zeros for the pooled prompt, latents without the VAE's shift), else SD3.5's."""
    import diffusers
    from diffusers import ControlNetModel

    if family == "flux":
        return _tiny_flux_controlnet_pipeline(img2img, nets, seed, reads, union, wrap)
    if family == "sd3":
        return _tiny_sd3_controlnet_pipeline(nets, seed, zero_pooled)
    base = (tiny_sd_pipeline if family == "sd" else tiny_sdxl_pipeline)(seed=seed, scheduler=scheduler)
    torch.manual_seed(seed + 1)
    controlnets = []
    for _ in range(nets):
        net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
        if union:   # SDXL's Union nets (ControlNet++): one net reading several pictures, each of a kind
            from diffusers import ControlNetUnionModel

            width = base.unet.config.block_out_channels[0]
            config = {k: v for k, v in net.config.items() if not k.startswith("_") and k != "mid_block_type"}
            net = ControlNetUnionModel.from_config({**config, "num_control_type": 6, "num_trans_channel": width,
                                                    "num_trans_head": 2, "num_proj_channel": width}).eval()
        with torch.no_grad():
            unions = [net.spatial_ch_projs] if union else []
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, *unions]:
                torch.nn.init.normal_(conv.weight, std=0.05)
            # strong enough that the control image's content, not only its presence, shows
            for conv in net.controlnet_cond_embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        controlnets.append(net)
    name = ("StableDiffusion" if family == "sd" else "StableDiffusionXL") + "ControlNet" + ("Union" if union else "") \
        + ("Img2Img" if img2img else "") + "Pipeline"
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder",)}
    extra = {"requires_aesthetics_score": False} if family == "sdxl" and img2img else {}
    if nets > 1 and union:
        from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel

        controlnets = [MultiControlNetUnionModel(controlnets)]
    controlnet = controlnets[0] if len(controlnets) == 1 else controlnets
    pipe = getattr(diffusers, name)(**components, controlnet=controlnet, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_flux_controlnet_pipeline(img2img: bool, nets: int, seed: int, reads: str, union: bool, wrap: bool):
    from diffusers import (FluxControlNetImg2ImgPipeline, FluxControlNetModel, FluxControlNetPipeline,
                           FluxMultiControlNetModel)

    if reads not in ("latents", "pixels"):
        raise ValueError(f"reads must be 'latents' or 'pixels', got {reads!r}")
    base = tiny_flux_pipeline(seed=seed)
    torch.manual_seed(seed + 1)
    controlnets = []
    for _ in range(nets):
        # XLabs' nets: an input block of their own reading pixels, 2×2 patches of its output a token
        net = FluxControlNetModel(
            patch_size=2 if reads == "pixels" else 1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6), num_mode=4 if union else None,
            conditioning_embedding_channels=16 if reads == "pixels" else None).eval()
        with torch.no_grad():   # its zero-initialised layers drawn, so that the control picture shows
            for layer in [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]:
                torch.nn.init.normal_(layer.weight, std=0.3)
            if union:   # the mode's token strong enough beside the prompt's that the mode shows
                torch.nn.init.normal_(net.controlnet_mode_embedder.weight, std=10.0)
            for conv in (net.input_hint_block.modules() if net.input_hint_block is not None else ()):
                if isinstance(conv, torch.nn.Conv2d):   # strong enough that the picture's content shows
                    torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        controlnets.append(net)
    controlnet = FluxMultiControlNetModel(controlnets) if nets > 1 or wrap else controlnets[0]
    cls = FluxControlNetImg2ImgPipeline if img2img else FluxControlNetPipeline
    accepted = set(inspect.signature(cls.__init__).parameters)
    pipe = cls(**{k: v for k, v in base.components.items() if k in accepted}, controlnet=controlnet)
    pipe.default_sample_size = base.default_sample_size
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sd3_controlnet_pipeline(nets: int, seed: int, zero_pooled: bool):
    from diffusers import SD3ControlNetModel, SD3MultiControlNetModel, StableDiffusion3ControlNetPipeline

    base = tiny_sd3_pipeline(seed=seed)
    torch.manual_seed(seed + 1)
    controlnets = []
    for _ in range(nets):
        config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
        net = SD3ControlNetModel.from_config({**config, "num_layers": 1, "extra_conditioning_channels": 0,
                                              "force_zeros_for_pooled_projection": zero_pooled}).eval()
        with torch.no_grad():   # its zero-initialised layers drawn, so that the control picture shows
            for layer in [*net.controlnet_blocks, net.pos_embed_input.proj]:
                torch.nn.init.normal_(layer.weight, std=0.3)
        controlnets.append(net)
    controlnet = SD3MultiControlNetModel(controlnets) if nets > 1 else controlnets[0]
    accepted = set(inspect.signature(StableDiffusion3ControlNetPipeline.__init__).parameters)
    pipe = StableDiffusion3ControlNetPipeline(**{k: v for k, v in base.components.items() if k in accepted},
                                              controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_inpaint_pipeline(family: str = "sd", reads_mask: bool = True, seed: int = 0, scheduler: str = "ddim"):
    """A tiny SD ("sd"), SDXL ("sdxl") or SD3 ("sd3") inpainting pipeline (64×64 images): with a
    denoiser of its own that reads the mask and the masked latents (9 input channels, SD3's 33;
    random weights) when `reads_mask`, else the plain tiny one, whose known region the pipeline
    blends back after each step. `scheduler` is SD's and SDXL's."""
    import diffusers

    if family == "sd3":
        base = tiny_sd3_pipeline(seed=seed)
    else:
        base = (tiny_sd_pipeline if family == "sd" else tiny_sdxl_pipeline)(seed=seed, scheduler=scheduler)
    components = dict(base.components)
    if reads_mask:
        torch.manual_seed(seed + 1)
        name = "transformer" if family == "sd3" else "unet"
        module, channels = components[name], base.vae.config.latent_channels
        components[name] = type(module).from_config(module.config, in_channels=2 * channels + 1).eval()
    name = {"sd": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline",
            "sd3": "StableDiffusion3InpaintPipeline"}[family]
    cls = getattr(diffusers, name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    pipe = cls(**{k: v for k, v in components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ip_adapter(pipe, seed: int = 0, tokens: int = 4):
    """Load a tiny random IP-Adapter into an SD or SDXL `pipe` (a small CLIP image encoder and its
    feature extractor registered on it, the adapter's image projection and its key/value
    projections for every cross-attention layer), through diffusers' own ``load_ip_adapter``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37)).eval()
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    state = {"image_proj": {"proj.weight": torch.randn(tokens * cross, 32) * 0.1, "proj.bias": torch.zeros(tokens * cross),
                            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)},
             "ip_adapter": {}}
    key = 1   # the adapter's numbering: every attention layer counts, the cross-attention ones hold weights
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{key}.{kind}.weight"] = torch.randn(hidden, cross) * 0.2
        key += 2
    pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, img2img: bool = False, vae: str = "kl"):
    """A Stable-Diffusion-3-shaped pipeline small enough for CPU tests (64×64 images), without T5.

    Without T5 the prompt is 77 CLIP tokens (hidden 32 + 48, zero-padded to 96) followed by
    ``max_sequence_length`` (256) zero tokens; at width 32 that is still fast. The VAE ("kl" or
    "tiny") has 16 latent channels, a scaling and a shift factor, as SD3's does.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = _tiny_clip_text_encoder(len(tokenizer), hidden_size=32, projection_dim=32)
    text_encoder_2 = _tiny_clip_text_encoder(len(tokenizer_2), hidden_size=48, projection_dim=48)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 48,
        pos_embed_max_size=16,
    ).eval()
    sd3_vae = dict(use_quant_conv=False, use_post_quant_conv=False) if vae == "kl" else {}
    vae = tiny_vae(vae, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, **sd3_vae)
    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    return cls(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flux_pipeline(seed: int = 0, img2img: bool = False, distilled: bool = True, fill: bool = False,
                       control: bool = False, kontext: bool = False, inpaint: bool = False):
    """A FLUX.1-shaped pipeline small enough for CPU tests (64×64 images by default): CLIP's pooled prompt and a
    T5 encoder's tokens, a transformer with double- and single-stream blocks, a 16-channel VAE with a
    scaling and a shift factor. `distilled`: FLUX.1-dev's kind (the guidance scale an input, the
    schedule shifted by the image's size); else FLUX.1-schnell's (neither). The T5 tower reads the
    CLIP tokenizer's ids (no T5 vocabulary is written offline); its token count is the pipeline's
    ``max_sequence_length``. `fill`: FLUX.1-Fill's inpainting pipeline, its transformer reading the
    masked picture's latents and the mask's 8×8 cells beside the latents. `control`: FLUX.1 Canny /
    Depth's pipeline (with `img2img`, its img2img one), its transformer reading a control picture's
    latents beside the latents.
    `kontext`: FLUX.1 Kontext's, whose transformer reads a context picture's tokens after the image's.
    `inpaint`: the plain transformer's inpainting pipeline (the known region blended back each step)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxControlImg2ImgPipeline, FluxControlPipeline,
                           FluxFillPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(max_length=512)
    text_encoder = _tiny_clip_text_encoder(len(tokenizer), hidden_size=32)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()
    # per token (a 2×2 patch): the latents' 16 channels; Fill's masked latents' 16 and the mask's 8×8 cells too,
    # Control's control latents' 16
    read = 16 + 16 + 64 if fill else 16 + 16 if control else 16
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * read, out_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=distilled,
        axes_dims_rope=(4, 6, 6)).eval()
    vae = tiny_vae("kl", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                   use_post_quant_conv=False)
    shifts = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096) if distilled else dict(shift=1.0)
    kinds = {FluxImg2ImgPipeline: img2img and not control, FluxFillPipeline: fill,
             FluxControlPipeline: control and not img2img, FluxControlImg2ImgPipeline: control and img2img,
             FluxKontextPipeline: kontext, FluxInpaintPipeline: inpaint}
    if sum(kinds.values()) > 1:
        raise ValueError("img2img, fill, control, kontext and inpaint: choose one kind of pipeline (img2img goes "
                         "with control)")
    cls = next((kind for kind, chosen in kinds.items() if chosen), FluxPipeline)
    pipe = cls(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**shifts), vae=vae,
               text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.default_sample_size = 8   # 64×64 by default, as the other tiny pipelines (FLUX.1's own: 1024×1024)
    return pipe

# --- Real architectures, random weights ----------------------------------------------------------
# The configs below are the published ones (the repositories' config.json), less the keys that
# match the constructors' defaults. They cost what the trained models cost; the outputs are noise.

_SD_UNET = dict(  # runwayml/stable-diffusion-v1-5: 859.52M parameters
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
_SD2_UNET = dict(  # stabilityai/sd-turbo (SD 2.1 base, 512²): 865.91M
    _SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
_SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0: 2567.46M
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
_SD3_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers: 2028M
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)
_VAE = dict(  # the SD 1.x / 2.x / XL AutoencoderKL: 83.65M
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
_SD3_VAE = dict(_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)

# CLIP text towers: ViT-L/14 (SD 1.x, first of XL and 3), OpenCLIP ViT-H (SD 2.x, last layer
# dropped: 23 of 24) and OpenCLIP ViT-bigG (second of XL and 3).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
               hidden_act="gelu", projection_dim=512)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               hidden_act="gelu", projection_dim=1280)

_DENOISERS = {
    "sd15": ("UNet2DConditionModel", _SD_UNET),
    "sd-turbo": ("UNet2DConditionModel", _SD2_UNET),
    "sdxl": ("UNet2DConditionModel", _SDXL_UNET),
    "sd3": ("SD3Transformer2DModel", _SD3_TRANSFORMER),
}


def _build(make, torch_dtype, device):
    """``make()`` with its weights initialised on ``device`` (``"meta"`` allocates nothing), cast to ``torch_dtype``."""
    with torch.device(device):
        model = make()
    if torch_dtype != torch.float32:  # (nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast)
        model = torch.nn.Module.to(model, torch_dtype)
    return model.eval()


def architecture_denoiser(name: str, torch_dtype=torch.float32, device="cpu"):
    """The UNet or transformer of architecture ``name`` (a key of :data:`ARCHITECTURES`), random weights."""
    import diffusers

    if name not in _DENOISERS:
        raise ValueError(f"name must be one of {sorted(_DENOISERS)}, got {name!r}")
    cls_name, config = _DENOISERS[name]
    return _build(lambda: getattr(diffusers, cls_name)(**config), torch_dtype, device)


def _clip_text(config: dict, tokenizer, with_projection: bool, torch_dtype, device):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # Special-token ids follow the tokenizer, so the pooled output is taken at its end-of-text token.
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _build(lambda: cls(config), torch_dtype, device)


def _vae(kind: str, config: dict, torch_dtype, device, **tiny_config):
    from diffusers import AutoencoderKL, AutoencoderTiny

    if kind == "kl":
        return _build(lambda: AutoencoderKL(**config), torch_dtype, device)
    if kind == "tiny":  # TAESD's architecture (the AutoencoderTiny defaults)
        return _build(lambda: AutoencoderTiny(**tiny_config), torch_dtype, device)
    raise ValueError(f"vae must be 'kl' or 'tiny', got {kind!r}")


def _sd_schedule(cls_name: str, **config):
    import diffusers

    return getattr(diffusers, cls_name)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000, steps_offset=1, **config)


def _sd_pipeline(arch: str, text: dict, vae_size: int, scheduler, torch_dtype, device, vae: str):
    """An SD 1.x / 2.x pipeline of architecture `arch` with random weights."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(vae, dict(_VAE, sample_size=vae_size), torch_dtype, device),
        text_encoder=_clip_text(text, tokenizer, False, torch_dtype, device), tokenizer=tokenizer,
        unet=architecture_denoiser(arch, torch_dtype, device), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sd15_pipeline(torch_dtype=torch.float32, device="cpu", vae: str = "kl"):
    """Stable Diffusion 1.5 (512²) with random weights: CLIP-L text encoder, 859.52M-parameter UNet."""
    return _sd_pipeline("sd15", _CLIP_L, 512, _sd_schedule("PNDMScheduler", skip_prk_steps=True,
                                                           set_alpha_to_one=False), torch_dtype, device, vae)


def sd_turbo_pipeline(torch_dtype=torch.float32, device="cpu", vae: str = "kl"):
    """SD-Turbo (SD 2.1 base architecture, 512²) with random weights: OpenCLIP-H text encoder, 865.91M UNet."""
    return _sd_pipeline("sd-turbo", _CLIP_H, 768, _sd_schedule("EulerDiscreteScheduler", timestep_spacing="trailing"),
                        torch_dtype, device, vae)


def sdxl_pipeline(torch_dtype=torch.float32, device="cpu", vae: str = "kl"):
    """Stable Diffusion XL base 1.0 (1024²) with random weights: CLIP-L + OpenCLIP-bigG, 2567.46M UNet."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_vae(vae, dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True), torch_dtype, device),
        text_encoder=_clip_text(_CLIP_L, tokenizer, False, torch_dtype, device),
        text_encoder_2=_clip_text(_CLIP_G, tokenizer_2, True, torch_dtype, device),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=architecture_denoiser("sdxl", torch_dtype, device),
        scheduler=_sd_schedule("EulerDiscreteScheduler", timestep_spacing="leading"),
        add_watermarker=False,
    )


def sd3_pipeline(torch_dtype=torch.float32, device="cpu", vae: str = "kl"):
    """Stable Diffusion 3 medium (1024²) with random weights and no T5: CLIP-L + OpenCLIP-bigG, 2028M transformer.

    ``vae="tiny"`` is TAESD's architecture with 16 latent channels (as TAESD3).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=architecture_denoiser("sd3", torch_dtype, device),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(vae, dict(_SD3_VAE, sample_size=1024), torch_dtype, device,
                 latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text(_CLIP_L, tokenizer, True, torch_dtype, device),
        text_encoder_2=_clip_text(_CLIP_G, tokenizer_2, True, torch_dtype, device),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


class Architecture(NamedTuple):
    """A real model architecture: its pipeline builder, native resolution and denoiser size (published)."""

    pipeline: Callable
    resolution: int
    denoiser_params_m: float


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture(sd15_pipeline, 512, 859.52),
    "sd-turbo": Architecture(sd_turbo_pipeline, 512, 865.91),
    "sdxl": Architecture(sdxl_pipeline, 1024, 2567.46),
    "sd3": Architecture(sd3_pipeline, 1024, 2028.33),
}
