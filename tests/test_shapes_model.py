"""The shapes-world model: its configs, tokenizer, resumable training, and the committed weights."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.shapes import model as M
from fastdiff.shapes import train as T
from fastdiff.shapes.render import caption, sample_scene, vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return M.build_tokenizer()


def test_pipeline_builds_with_scale_factor_8_and_8x8_latents(tokenizer):
    torch.manual_seed(0)
    pipe = M.build_pipeline(tokenizer=tokenizer)
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
        assert latents.shape == (1, 4, 8, 8)
        assert pipe.vae.decode(latents).sample.shape == (1, 3, 64, 64)
        ids = tokenizer(["red background"], padding="max_length", return_tensors="pt").input_ids
        context = pipe.text_encoder(ids)[0]
        assert context.shape == (1, M.MAX_TOKENS, M.UNET_CONFIG["cross_attention_dim"])
        assert pipe.unet(latents, 10, context).sample.shape == (1, 4, 8, 8)


def test_tokenizer_keeps_words_whole_and_fits_the_longest_caption(tokenizer):
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    rng = np.random.default_rng(0)
    longest = max(len(tokenizer(caption(sample_scene(rng, 3), "paraphrase", rng)).input_ids)
                  for _ in range(500))   # the longest of 2,000 (35 tokens) is among the first 100
    assert longest <= M.MAX_TOKENS


def _vae_run(workdir, steps):
    T.main(["vae", "--workdir", str(workdir), "--steps", str(steps), "--batch", "2", "--threads", "1",
            "--minutes", "5", "--psnr-images", "8"])
    return torch.load(os.path.join(workdir, "vae.pt"), weights_only=False)


def test_training_resumes_from_its_checkpoint(tmp_path):
    straight = _vae_run(tmp_path / "straight", 2)
    _vae_run(tmp_path / "parts", 1)
    resumed = _vae_run(tmp_path / "parts", 2)
    assert resumed["step"] == straight["step"] == 2
    # The data and noise streams continued where the first part stopped, not from the seed.
    assert resumed["np_rng"] == straight["np_rng"]
    assert torch.equal(resumed["torch_rng"], straight["torch_rng"])
    assert resumed["opt"]["state"][0]["step"] == 2


def test_the_hard_negative_twin_changes_one_shape_and_nothing_else():
    import numpy as np

    from fastdiff.shapes.render import batch_scenes

    rng = np.random.default_rng(3)
    scenes, captions = batch_scenes(32, rng)
    for scene, text in zip(scenes, captions):
        twin = T._shape_twin(scene, text, rng)[0]
        changed = [(a.shape, b.shape) for a, b in zip(scene.objects, twin.objects) if a.shape != b.shape]
        assert len(changed) == 1 and changed[0][0] != changed[0][1]
        assert twin.background == scene.background
        assert [(o.colour, o.size, o.position, o.centre, o.diameter, o.angle) for o in twin.objects] == \
            [(o.colour, o.size, o.position, o.centre, o.diameter, o.angle) for o in scene.objects]


def test_the_unet_batch_ends_in_shape_twins_of_its_first_pictures():
    import numpy as np

    from fastdiff.shapes.render import parse_caption

    x, captions = T._twinned_batch(40, 10, np.random.default_rng(6))
    assert x.shape == (40, 3, 64, 64) and len(captions) == 40
    for i in range(10):
        original, twin = captions[i], captions[30 + i]
        if original == "":   # dropped for guidance together
            assert twin == ""
            continue
        a, b = parse_caption(original), parse_caption(twin)
        assert [o.shape != p.shape for o, p in zip(a.objects, b.objects)].count(True) == 1
        assert [(o.colour, o.size, o.position) for o in a.objects] == [(o.colour, o.size, o.position) for o in b.objects]
        differs = (x[i] != x[30 + i]).any(dim=0)
        assert 0 < differs.float().mean() < 0.25   # one object redrawn, the rest of the picture kept
    assert not torch.equal(x[:10], x[10:20])


def test_a_pretrained_text_encoder_learns_and_stays_frozen_under_the_unet(tmp_path):
    """The CLIP-style stage lowers its contrastive loss on a fixed batch, and the UNet stage then
    trains with that encoder frozen (its weights come out unchanged), also when resumed."""
    import numpy as np

    from fastdiff.shapes.render import batch_tensors

    T.main(["vae", "--workdir", str(tmp_path), "--steps", "1", "--batch", "2", "--threads", "1", "--psnr-images", "8"])
    T.main(["text", "--workdir", str(tmp_path), "--steps", "1", "--batch", "16", "--threads", "1"])
    first = torch.load(tmp_path / "text.pt", weights_only=False)
    T.main(["text", "--workdir", str(tmp_path), "--steps", "40", "--batch", "16", "--threads", "1", "--lr", "2e-3"])
    trained = torch.load(tmp_path / "text.pt", weights_only=False)
    assert trained["step"] == 40

    def loss(state):   # the live weights' contrastive loss on one fixed batch
        tokenizer = M.build_tokenizer()
        text_encoder = M.build_text_encoder(tokenizer)
        text_encoder.load_state_dict(state["model"]["text_encoder"])
        heads = T.contrastive_heads()
        heads.load_state_dict(state["model"]["heads"])
        x, captions = batch_tensors(16, np.random.default_rng(5))
        ids = tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt").input_ids
        with torch.no_grad():
            return float(T._contrastive_loss(heads["text_projection"](text_encoder(ids).pooler_output),
                                             heads["image"](x), heads.log_scale))

    assert loss(trained) < loss(first)
    retrieval = T.shape_retrieval(str(tmp_path), n=12)
    assert set(retrieval) >= {"pairwise", "all"} and 0 <= retrieval["all"] <= retrieval["pairwise"] <= 1
    for steps in ("1", "2"):   # a fresh run, then a resumed one; a batch of 4 holds one twin pair
        T.main(["unet", "--workdir", str(tmp_path), "--steps", steps, "--batch", "4", "--threads", "1"])
        unet = torch.load(tmp_path / "unet.pt", weights_only=False)
        assert unet["extra"]["text_encoder"] == "pretrained, frozen"
        assert unet["extra"]["shape_twins"] == T.SHAPE_TWIN_SHARE
        for name, value in trained["ema"]["text_encoder"].items():
            assert torch.equal(unet["model"]["text_encoder"][name], value), name


weights = pytest.mark.skipif(not os.path.isfile(os.path.join(M.WEIGHTS_DIR, "model_index.json")),
                             reason="no trained weights committed")


@weights
def test_committed_weights_fit_32_mb():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(M.WEIGHTS_DIR) for f in fs)
    assert size <= 32e6


REFERENCE = os.path.join(os.path.dirname(__file__), "data", "shapes_reference.png")
REFERENCE_PROMPTS = ["a large red circle in the center, white background",
                     "a small blue square at the top left and a large yellow triangle on the right, gray background"]


def _reference_images(pipe):
    return pipe(REFERENCE_PROMPTS, num_inference_steps=25, guidance_scale=M.GUIDANCE_SCALE,
                guidance_rescale=M.GUIDANCE_RESCALE,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@weights
def test_committed_pipeline_loads_offline_and_its_outputs_are_stable():
    pipe = M.load_pipeline()
    assert pipe.vae.config.scaling_factor != 1.0  # the measured one was written into the config
    first, second = _reference_images(pipe), _reference_images(pipe)
    assert first.shape == (2, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    # The same pictures as when the weights were committed (tests/data/shapes_reference.png, the
    # prompts side by side); other CPUs' kernels may round differently, hence the small tolerance.
    reference = np.asarray(Image.open(REFERENCE)).astype(np.float32) / 255
    got = np.concatenate(list(first), axis=1)
    assert np.abs(got - reference).mean() < 2 / 255 and np.abs(got - reference).max() < 0.25


@weights
def test_model_holds_its_measured_quality_on_small_held_out_sets():
    # 32 held-out prompts per kind at 25 DDIM steps, the model's guidance; coverage on 4 unstated
    # prompts × 8 seeds. The floors sit well under what the committed weights measured on 256
    # prompts per kind (92.8 / 82.9 / 74.3 / 85.3%, coverage 0.914 on 256 × 8; BENCHMARKS.md,
    # "Shapes model"): they catch a broken pipeline, loader or evaluator, not a point of quality.
    pipe = M.load_pipeline()
    floors = {"one": 0.84, "two": 0.68, "three": 0.60, "unstated": 0.74}
    for kind, floor in floors.items():
        result = T.evaluate(pipe, kind, count=32, steps=25)
        assert result["overall"] >= floor, (kind, result)
        assert result["background"] >= 0.95 and result["position"] >= 0.55, (kind, result)
    spread = T.evaluate_coverage(pipe, count=4, repeats=8, steps=25)
    assert spread["overall"] >= 0.78 and spread["position"] >= 0.9, spread


@weights
def test_init_seeds_a_workdir_that_reproduces_the_committed_pipeline_and_trains_on(tmp_path):
    """`init` warm-starts from the committed weights: the seeded workdir is the same pipeline, and
    the ``unet`` stage continues from it (from step 0, the committed text encoder training jointly)."""
    T.main(["init", "--workdir", str(tmp_path)])
    committed, seeded = M.load_pipeline(), T.pipeline_from_workdir(str(tmp_path))

    def draw(pipe):
        return pipe(REFERENCE_PROMPTS[:1], num_inference_steps=2, guidance_scale=M.GUIDANCE_SCALE,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    np.testing.assert_allclose(draw(seeded), draw(committed), atol=1e-5)
    T.main(["unet", "--workdir", str(tmp_path), "--steps", "1", "--batch", "2", "--threads", "1"])
    state = torch.load(tmp_path / "unet.pt", weights_only=False)
    assert state["step"] == 1 and state["extra"]["text_encoder"] == "joint"
    assert state["extra"]["scaling_factor"] == committed.vae.config.scaling_factor
    T.main(["init", "--workdir", str(tmp_path)])   # a second init keeps the run it finds
    assert torch.load(tmp_path / "unet.pt", weights_only=False)["step"] == 1
