"""The tiny pipelines generate, the vocabulary tokenizes, the real architectures have their published sizes."""

import warnings

import pytest
import torch

from fastdiff.architectures import (
    ARCHITECTURES,
    architecture_denoiser,
    tiny_clip_tokenizer,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from fastdiff.vocab import DEFAULT_WORDS, unknown_words, write_clip_vocab


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: a second thread only adds waiting, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(pipe, img2img, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    if img2img:
        kwargs.update(image=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), strength=0.6)
    return pipe("a red fox on a tree", num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def _check_image(image):
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


@pytest.mark.parametrize("img2img", [False, True])
@pytest.mark.parametrize("vae", ["kl", "tiny"])
def test_tiny_sd(vae, img2img):
    _check_image(_generate(tiny_sd_pipeline(vae=vae, img2img=img2img), img2img))


@pytest.mark.parametrize("scheduler", ["lcm", "euler"])
def test_tiny_sd_schedulers(scheduler):
    _check_image(_generate(tiny_sd_pipeline(scheduler=scheduler), False))


def test_tiny_sd_is_seeded_and_scheduler_is_current():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # diffusers warns when steps_offset != 1
        first, second = tiny_sd_pipeline(seed=3), tiny_sd_pipeline(seed=3)
    assert first.scheduler.config.steps_offset == 1
    assert torch.equal(_generate(first, False), _generate(second, False))


@pytest.mark.parametrize("img2img", [False, True])
@pytest.mark.parametrize("vae", ["kl", "tiny"])
def test_tiny_sdxl(vae, img2img):
    pipe = tiny_sdxl_pipeline(vae=vae, img2img=img2img)
    assert pipe.unet.config.addition_embed_type == "text_time"
    _check_image(_generate(pipe, img2img))


@pytest.mark.parametrize("img2img", [False, True])
@pytest.mark.parametrize("vae", ["kl", "tiny"])
def test_tiny_sd3(vae, img2img):
    pipe = tiny_sd3_pipeline(img2img=img2img, vae=vae)
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor
    _check_image(_generate(pipe, img2img))
    _check_image(_generate(pipe, img2img, max_sequence_length=16))


def test_write_clip_vocab(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_clip_vocab(str(tmp_path), words=["fox", "watercolor"])
    tokenizer = CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", pad_token="<|endoftext|>")
    assert len(tokenizer("watercolor fox", add_special_tokens=False).input_ids) == 2
    assert len(tokenizer("cat", add_special_tokens=False).input_ids) == 3  # unlisted: spelled out

    tokenizer = tiny_clip_tokenizer()
    for word in DEFAULT_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a zebra, 42 stripes!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and max(ids) < len(tokenizer)


# Published parameter counts, in millions.
DENOISER_PARAMS = {"sd15": 859.52, "sd-turbo": 865.91, "sdxl": 2567.46, "sd3": 2028.0}
CLIP_L_PARAMS = 123.06


def _millions(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("name", sorted(DENOISER_PARAMS))
def test_architecture_sizes(name):
    assert set(ARCHITECTURES) == set(DENOISER_PARAMS)
    denoiser = architecture_denoiser(name, torch.float16, device="meta")
    assert denoiser.dtype == torch.float16
    assert _millions(denoiser) == pytest.approx(DENOISER_PARAMS[name], rel=5e-3)

    pipe = ARCHITECTURES[name].pipeline(torch_dtype=torch.float16, device="meta")
    assert _millions(pipe.unet if name != "sd3" else pipe.transformer) == pytest.approx(DENOISER_PARAMS[name], rel=5e-3)
    if name == "sd15":
        assert _millions(pipe.text_encoder) == pytest.approx(CLIP_L_PARAMS, rel=5e-3)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_architecture_tiny_vae(name):
    pipe = ARCHITECTURES[name].pipeline(device="meta", vae="tiny")
    assert type(pipe.vae).__name__ == "AutoencoderTiny"
    assert pipe.vae.config.latent_channels == (16 if name == "sd3" else 4)


def test_unknown_words_of_a_word_level_tokenizer():
    tokenizer = tiny_clip_tokenizer(words=["a", "red", "circle"])
    assert unknown_words(tokenizer, "a red circle") == []
    assert unknown_words(tokenizer, "A watercolor painting of a red circle") == ["of", "painting", "watercolor"]
