import numpy as np
import pytest
import torch

from fastdiff.shapes.render import (
    COLOURS, POSITIONS, SHAPES, SIDES, Obj, Scene, batch_tensors, caption, heldout_prompts,
    parse_caption, render, render_batch, sample_scene, scene_stream, vocabulary,
)
from fastdiff.testing import tiny_clip_tokenizer


def pixels(image):
    return np.asarray(image)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_same_seed_same_pixels_and_captions_other_seed_other():
    a, b, c = (take(scene_stream(seed), 20) for seed in (7, 7, 8))
    assert all(np.array_equal(pixels(x[0]), pixels(y[0])) and x[1:] == y[1:] for x, y in zip(a, b))
    assert [x[1] for x in a] != [x[1] for x in c]
    assert not all(np.array_equal(pixels(x[0]), pixels(y[0])) for x, y in zip(a, c))


def test_stream_and_batch_tensors_draw_the_same_scenes():
    images, captions = batch_tensors(10, np.random.default_rng(3))
    stream = take(scene_stream(3), 10)
    assert captions == [text for _, text, _ in stream]
    from_stream = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _, _ in stream])
    assert images.shape == (10, 3, 64, 64) and images.dtype == torch.float32
    assert torch.equal(images, from_stream.float() / 127.5 - 1)
    assert images.min() >= -1 and images.max() <= 1


def test_render_is_64x64_rgb_and_deterministic():
    scene = Scene("blue", [Obj("triangle", "yellow", "small", "top right", (0.3, -0.7))])
    image = render(scene)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.array_equal(pixels(image), pixels(render(scene)))
    assert np.array_equal(pixels(image), render_batch([scene, scene])[1])


@pytest.mark.parametrize("scene,text", [
    (Scene("blue", [Obj("triangle", "yellow", "small", "top right")]),
     "a small yellow triangle at the top right, blue background"),
    (Scene("gray", [Obj("square", "white", "large", "center")]),
     "a large white square in the center, gray background"),
    (Scene("white", [Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "top right")]),
     "a large red circle on the left and a small blue square at the top right, white background"),
])
def test_canonical_captions_read_as_specified(scene, text):
    assert caption(scene) == text
    assert parse_caption(text) == scene


def test_every_position_has_its_canonical_phrase():
    phrases = {
        "center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
        "bottom": "at the bottom", "top left": "at the top left", "top right": "at the top right",
        "bottom left": "at the bottom left", "bottom right": "at the bottom right",
    }
    for position, phrase in phrases.items():
        scene = Scene("black", [Obj("circle", "green", "small", position)])
        assert caption(scene) == f"a small green circle {phrase}, black background"


def test_captions_round_trip_canonical_and_paraphrased():
    rng = np.random.default_rng(0)
    paraphrases = set()
    for _ in range(300):
        scene = sample_scene(rng)
        assert parse_caption(caption(scene)) == scene
        text = caption(scene, "paraphrase", rng)
        paraphrases.add(text.replace(scene.background, "<bg>"))
        assert parse_caption(text) == scene, text
    assert len(paraphrases) > 100  # the wording really varies
    assert caption(Scene("orange", [Obj("circle", "red", "small", "left")]), "paraphrase", 1).count("a orange") == 0


def test_parse_caption_needs_a_background():
    with pytest.raises(ValueError, match="background"):
        parse_caption("a small red circle on the left")
    assert parse_caption("white background") == Scene("white", [])


def test_every_vocabulary_word_is_one_token():
    words = vocabulary()
    assert {*COLOURS, *SHAPES, "small", "large", "background", "and"} <= set(words)
    tokenizer = tiny_clip_tokenizer(words=words)
    assert all(tokenizer.tokenize(word) == [word + "</w>"] for word in words)
    # and a caption is exactly its words (and commas)
    rng = np.random.default_rng(1)
    for _ in range(50):
        text = caption(sample_scene(rng), "paraphrase", rng)
        assert len(tokenizer.tokenize(text)) == len(text.replace(",", " ,").split())


def test_scenes_follow_the_rules():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng, two_objects_prob=0.5) for _ in range(2000)]
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2}
    for s in scenes:
        assert all(o.colour != s.background and o.colour in COLOURS for o in s.objects)
        assert all(o.shape in SHAPES and o.size in SIDES and o.position in POSITIONS for o in s.objects)
        if len(s.objects) == 2:
            assert s.objects[0].position != s.objects[1].position


def test_two_objects_never_overlap_or_touch():
    rng = np.random.default_rng(4)
    scenes = [sample_scene(rng, two_objects_prob=1.0) for _ in range(500)]
    # Draw each object alone; the two footprints, grown by a pixel, must stay apart.
    alone = [render_batch([Scene(s.background, [s.objects[k]]) for s in scenes]) for k in (0, 1)]
    bg = render_batch([Scene(s.background) for s in scenes])
    a, b = ((x != bg).any(-1) for x in alone)
    grown = a.copy()
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    grown[:, :, 1:] |= a[:, :, :-1]
    grown[:, :, :-1] |= a[:, :, 1:]
    assert not (grown & b).any()
    # and drawing both gives each object's pixels untouched
    both = render_batch(scenes)
    assert np.array_equal(both[a], alone[0][a]) and np.array_equal(both[b], alone[1][b])


def test_sizes_are_latent_friendly():
    assert SIDES["small"] >= 16 and SIDES["large"] >= 1.5 * SIDES["small"]
    image = pixels(render(Scene("black", [Obj("square", "white", "small", "center")])))
    assert (image[..., 0] > 128).sum() >= 16 * 16


def test_heldout_prompts_are_fixed_distinct_and_canonical():
    one, two = heldout_prompts("one"), heldout_prompts("two", count=100)
    assert len(one) == 256 and len(two) == 100
    assert one == heldout_prompts("one")
    assert len({text for text, _ in one}) == 256
    assert all(len(s.objects) == 1 for _, s in one) and all(len(s.objects) == 2 for _, s in two)
    assert all(caption(s) == text and parse_caption(text) == s for text, s in one + two)
    assert heldout_prompts("one", 10, seed=5) != one[:10]
    with pytest.raises(ValueError):
        heldout_prompts("three")
