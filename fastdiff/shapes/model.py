"""The shapes-world text-to-image model: configs, builders, and the committed trained weights.

A Stable-Diffusion-shaped pipeline at 64×64: an AutoencoderKL (scale factor 8, so 8×8×4 latents),
a small CLIP text encoder over a word-level tokenizer of :func:`~fastdiff.shapes.render.vocabulary`,
a cross-attention UNet and a DDIM scheduler. Everything is built from the configs below; the
trained weights live in :data:`WEIGHTS_DIR` (``save_pretrained`` layout, fp16) and are made by
``python -m fastdiff.shapes.train``.
"""

from __future__ import annotations

import os
import tempfile

import torch

from ..vocab import write_clip_vocab
from .render import vocabulary

__all__ = [
    "WEIGHTS_DIR", "MAX_TOKENS", "GUIDANCE_SCALE", "GUIDANCE_RESCALE", "STREAM_STEPS",
    "VAE_CONFIG", "TEXT_CONFIG", "UNET_CONFIG", "SCHEDULER_CONFIG",
    "build_tokenizer", "build_vae", "build_text_encoder", "build_unet", "build_scheduler",
    "build_pipeline", "load_pipeline",
]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MAX_TOKENS = 48  # the longest caption (three objects, paraphrased) is 35 words + a comma + start/end tokens
# The guidance its quality figures are measured at (full CFG; guidance_rescale is diffusers' φ):
# the best measured (guidance 3 at φ 0 and 0.7, guidance 5 at φ 0; BENCHMARKS.md); φ 0.7 mostly
# widens the spread of what a prompt leaves free (coverage 0.80 → 0.84).
GUIDANCE_SCALE = 3.0
GUIDANCE_RESCALE = 0.7
# The img2img stream's default steps (indices into the 50-step schedule): late enough that a
# stream keeps the input picture and follows the prompt in its details.
STREAM_STEPS = (40, 45)

# Four levels give the scale factor 8 (64 → 8). Flat-colour scenes need little width at full
# resolution; the deep levels are wider, as turned shapes of any size must fit 8×8×4 latents (they
# cost little at 8×8 and 16×16). The decoder gets layers_per_block + 1 resnets per level.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    block_out_channels=(32, 64, 96, 128), layers_per_block=1, norm_num_groups=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=1.0,  # replaced by the measured 1/std of latents when the UNet is trained
)

TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, hidden_act="gelu", projection_dim=128,
)

# Latents are 8×8. Three levels (8×8, 4×4, 2×2), cross-attention at each: words are bound to
# colour and shape at 8×8, and the 2×2 level sees the whole frame at once. The deep levels are wide
# (up to three objects, each free in size, turn and place, must be told apart), which costs little
# at 4×4 and 2×2: 11.2 M parameters at about the compute of the first world's 5.9 M. (Placing
# objects where asked came from the schedule below, not from the 2×2 level: under SD's schedule the
# first world's UNet placed them at chance.)
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 192),
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    # diffusers reads `attention_head_dim` as the number of heads per level (its old misnomer): 2, 4, 6
    # heads of 32 channels each, rather than 32 heads of 2–6 (30% faster to train, a head a pruning unit).
    cross_attention_dim=TEXT_CONFIG["hidden_size"], attention_head_dim=(2, 4, 6), norm_num_groups=32,
)

# Zero terminal SNR (the last training step is pure noise, as sampling's first step is) with
# v-prediction, which stays defined there, and "trailing" spacing so sampling starts at that step.
# With SD's schedule the noisiest training latents keep 7% of the picture, enough to show where an
# object is: a model trained so takes the layout from that leak instead of the words, and places
# objects at random when it starts from pure noise.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False,
)


def build_tokenizer(folder: str | None = None):
    """A CLIPTokenizer that maps every vocabulary word to one token; its files go to `folder`
    (a temporary one if None)."""
    from transformers import CLIPTokenizer

    folder = write_clip_vocab(folder or tempfile.mkdtemp(prefix="fastdiff-shapes-vocab-"), vocabulary())
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")


def build_vae(**overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**VAE_CONFIG, **overrides})


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    # Special-token ids follow the tokenizer so the pooled output sits at the end-of-text token.
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **TEXT_CONFIG)
    return CLIPTextModel(config)


def build_unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_scheduler(**overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SCHEDULER_CONFIG, **overrides})


def build_pipeline(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=None):
    """A StableDiffusionPipeline from the given parts; missing ones are built fresh (random weights)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tokenizer or build_tokenizer()
    return StableDiffusionPipeline(
        vae=vae or build_vae(), text_encoder=text_encoder or build_text_encoder(tokenizer),
        tokenizer=tokenizer, unet=unet or build_unet(), scheduler=scheduler or build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(torch_dtype=torch.float32, device="cpu", folder: str | None = None):
    """The trained pipeline from :data:`WEIGHTS_DIR` (or `folder`), offline."""
    from diffusers import StableDiffusionPipeline

    folder = folder or WEIGHTS_DIR
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(
            f"no trained shapes pipeline in {folder}: train and export one with "
            f"`python -m fastdiff.shapes.train vae|unet|export`")
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=torch_dtype, local_files_only=True,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
