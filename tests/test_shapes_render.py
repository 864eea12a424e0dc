"""The world-2 renderer: determinism, captions, the freedoms a caption leaves, layouts that fit."""

import numpy as np
import pytest
import torch

from fastdiff.shapes.render import (
    CELL_BOUNDS, COLOURS, POSITIONS, SHAPES, SIZE_RANGES, SYMMETRY, TURN_RANGE, Obj, Scene, batch_tensors, caption,
    heldout_prompts, hide, parse_caption, realise, render, render_batch, reshape, sample_scene, scene_stream, signed_turn, vocabulary,
)
from fastdiff.architectures import tiny_clip_tokenizer


def pixels(image):
    return np.asarray(image)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def attributes(scene):
    return Scene(scene.background, [Obj(o.shape, o.colour, o.size, o.position) for o in scene.objects])


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(2)
    return [sample_scene(rng) for _ in range(1500)]


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


def test_render_is_64x64_rgb_deterministic_and_needs_a_full_scene():
    scene = Scene("blue", [Obj("triangle", "yellow", "small", "top right", (50.3, 12.7), 15.0, 33.0)])
    image = render(scene)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.array_equal(pixels(image), pixels(render(scene)))
    assert np.array_equal(pixels(image), render_batch([scene, scene])[1])
    with pytest.raises(ValueError, match="realise"):
        render(Scene("blue", [Obj("triangle", "yellow", "small", "top right")]))
    with pytest.raises(ValueError, match="realise"):
        render(Scene(None, [Obj("circle", "red", "small", "left", (10.0, 30.0), 14.0)]))


def test_a_turn_changes_squares_and_triangles_but_not_circles():
    def drawn(shape, angle):
        return pixels(render(Scene("black", [Obj(shape, "white", "large", "center", (32.0, 32.0), 24.0, angle)])))
    assert not np.array_equal(drawn("square", 0.0), drawn("square", 30.0))
    assert not np.array_equal(drawn("triangle", 0.0), drawn("triangle", 60.0))
    assert np.array_equal(drawn("circle", 0.0), drawn("circle", 30.0))
    # a full symmetry period gives the same picture (to anti-aliasing rounding)
    assert np.abs(drawn("square", 10.0).astype(int) - drawn("square", 100.0)).max() <= 1
    assert np.abs(drawn("triangle", 10.0).astype(int) - drawn("triangle", 130.0)).max() <= 1


@pytest.mark.parametrize("scene,text", [
    (Scene("blue", [Obj("triangle", "yellow", "small", "top right")]),
     "a small yellow triangle at the top right, blue background"),
    (Scene("gray", [Obj("square", "white", "large", "center")]),
     "a large white square in the center, gray background"),
    (Scene("white", [Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "top right"),
                     Obj("triangle", "green", "small", "bottom")]),
     "a large red circle on the left and a small blue square at the top right and "
     "a small green triangle at the bottom, white background"),
    (Scene(None, [Obj("circle", "red")]), "a red circle"),
    (Scene("blue", [Obj("circle", "orange", None, "left")]), "an orange circle on the left, blue background"),
    (Scene(None, [Obj("square", "cyan", "large"), Obj("circle", "black", None, "top")]),
     "a large cyan square and a black circle at the top"),
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


def test_captions_round_trip_canonical_and_paraphrased(scenes):
    rng = np.random.default_rng(0)
    paraphrases = set()
    for scene in scenes[:400]:
        stated = hide(scene, rng)
        assert parse_caption(caption(scene)) == attributes(scene)
        assert parse_caption(caption(stated)) == stated
        text = caption(stated, "paraphrase", rng)
        paraphrases.add(text)
        assert parse_caption(text) == stated, text
    assert len(paraphrases) > 300  # the wording really varies
    assert "a orange" not in caption(Scene("orange", [Obj("circle", "red", "small", "left")]), "paraphrase", 1)


def test_reshape_changes_one_object_in_the_picture_and_the_caption_alike(scenes):
    rng = np.random.default_rng(4)
    for scene in scenes[:200]:
        stated = hide(scene, rng)
        text = caption(stated, "paraphrase", rng)
        i = int(rng.integers(len(scene.objects)))
        shape = SHAPES[(SHAPES.index(scene.objects[i].shape) + 1) % len(SHAPES)]
        twin, twin_text = reshape(scene, text, i, shape)
        assert twin.objects[i].shape == shape and twin.objects[i].centre == scene.objects[i].centre
        assert [o for j, o in enumerate(twin.objects) if j != i] == [o for j, o in enumerate(scene.objects) if j != i]
        want = parse_caption(text)
        want.objects[i] = Obj(shape, *(getattr(want.objects[i], a) for a in ("colour", "size", "position")))
        assert parse_caption(twin_text) == want, (text, twin_text)
        assert len(twin_text) - len(text) == len(shape) - len(scene.objects[i].shape)
    one = Scene("white", [Obj("circle", "red", "small", "left", (12.0, 32.0), 16.0, 0.0)])
    with pytest.raises(ValueError, match="shape must be"):
        reshape(one, "a small red circle on the left", 0, "star")
    with pytest.raises(ValueError, match="names 0 objects"):
        reshape(one, "white background", 0, "square")
    with pytest.raises(ValueError, match="index must be"):
        reshape(one, "a small red circle on the left", 1, "square")


def test_parse_caption_leaves_unstated_parts_free_and_refuses_an_empty_caption():
    assert parse_caption("a small red circle on the left") == Scene(None, [Obj("circle", "red", "small", "left")])
    assert parse_caption("white background") == Scene("white", [])
    with pytest.raises(ValueError, match="names no"):
        parse_caption("a watercolor painting")


def test_every_vocabulary_word_is_one_token(scenes):
    words = vocabulary()
    assert {*COLOURS, *SHAPES, "small", "large", "background", "and", "a", "an"} <= set(words)
    tokenizer = tiny_clip_tokenizer(words=words)
    assert all(tokenizer.tokenize(word) == [word + "</w>"] for word in words)
    rng = np.random.default_rng(1)
    for scene in scenes[:50]:  # and a caption is exactly its words (and commas)
        text = caption(hide(scene, rng), "paraphrase", rng)
        assert len(tokenizer.tokenize(text)) == len(text.replace(",", " ,").split())


def _cell_of(centre):
    column, row = (int(np.digitize(v, CELL_BOUNDS[1:3])) for v in centre)
    return POSITIONS[row * 3 + column]


def test_scenes_follow_the_rules(scenes):
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes:
        assert all(o.colour != s.background and o.colour in COLOURS and o.shape in SHAPES for o in s.objects)
        assert len({o.position for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert _cell_of(o.centre) == o.position
            low, high = SIZE_RANGES[o.size]
            assert low <= o.diameter <= high
            assert 0 <= o.angle < SYMMETRY[o.shape]
    # every object lies wholly inside the frame, a pixel from its edge
    alone = render_batch([Scene(s.background, [o]) for s in scenes[:300] for o in s.objects])
    bare = render_batch([Scene(s.background) for s in scenes[:300] for _ in s.objects])
    ink = (alone != bare).any(-1)
    assert not ink[:, 0].any() and not ink[:, -1].any() and not ink[:, :, 0].any() and not ink[:, :, -1].any()


def test_a_caption_leaves_much_of_the_scene_free(scenes):
    ones = [s.objects[0] for s in scenes if len(s.objects) == 1]
    centre = [o for o in ones if o.position == "center"]
    xs = np.array([o.centre[0] for o in centre])
    assert xs.max() - xs.min() > 12  # not ±1 px: most of the 20 px cell
    small = np.array([o.diameter for o in ones if o.size == "small"])
    assert small.max() - small.min() > 4
    turns = np.array([signed_turn(o.shape, o.angle) for o in ones if o.shape != "circle"])
    assert np.abs(turns).max() <= TURN_RANGE
    # turns cover their range either way from upright
    assert np.histogram(turns, bins=4, range=(-TURN_RANGE, TURN_RANGE))[0].min() > len(turns) / 8


def test_objects_never_overlap_or_touch(scenes):
    many = [s for s in scenes if len(s.objects) > 1][:400]
    # Draw each object alone; the footprints, grown by two pixels, must stay apart.
    for i in range(3):
        for j in range(i):
            pairs = [s for s in many if len(s.objects) > i]
            a, b = (render_batch([Scene(s.background, [s.objects[k]]) for s in pairs]) for k in (i, j))
            bare = render_batch([Scene(s.background) for s in pairs])
            ink_a, ink_b = (a != bare).any(-1), (b != bare).any(-1)
            grown = ink_a.copy()
            for _ in range(2):
                g = grown.copy()
                g[:, 1:] |= grown[:, :-1]
                g[:, :-1] |= grown[:, 1:]
                g[:, :, 1:] |= grown[:, :, :-1]
                g[:, :, :-1] |= grown[:, :, 1:]
                grown = g
            assert not (grown & ink_b).any()


def test_hide_states_part_of_a_scene(scenes):
    rng = np.random.default_rng(5)
    stated = [hide(s, rng) for s in scenes]
    objects = [o for s in stated for o in s.objects]
    assert 0.2 < np.mean([o.position is None for o in objects]) < 0.4
    assert 0.2 < np.mean([o.size is None for o in objects]) < 0.4
    assert 0.2 < np.mean([s.background is None for s in stated]) < 0.4
    assert hide(scenes[0], rng, 0.0) == attributes(scenes[0])
    bare = hide(scenes[0], rng, 1.0)
    assert bare.background is None and all(o.size is None and o.position is None for o in bare.objects)


def test_realise_keeps_what_is_stated_and_draws_the_rest():
    rng = np.random.default_rng(6)
    free = Scene(None, [Obj("circle", "red")])
    drawn = [realise(free, rng) for _ in range(400)]
    assert all(d.objects[0].shape == "circle" and d.objects[0].colour == "red" for d in drawn)
    assert all(d.background not in (None, "red") for d in drawn)
    assert {d.objects[0].position for d in drawn} == set(POSITIONS)
    assert {d.objects[0].size for d in drawn} == {"small", "large"}
    assert len({d.background for d in drawn}) == len(COLOURS) - 1
    fixed = Scene("blue", [Obj("square", "white", "large", "top left"), Obj("circle", "red", None, None)])
    for d in (realise(fixed, rng) for _ in range(50)):
        assert attributes(d).objects[0] == fixed.objects[0] and d.background == "blue"
        assert d.objects[1].position != "top left"
    with pytest.raises(ValueError, match="one cell"):
        realise(Scene("blue", [Obj("circle", "red", "small", "left"), Obj("square", "red", "small", "left")]), rng)
    crowded = Scene("blue", [Obj("triangle", c, "large", p) for c, p in
                             zip(("red", "green", "white"), ("top left", "top", "top right"))])
    with pytest.raises(ValueError, match="no layout"):
        realise(crowded, rng)


def test_heldout_prompts_are_fixed_distinct_and_canonical():
    sets = {kind: heldout_prompts(kind, count=64) for kind in ("one", "two", "three", "unstated")}
    assert sets["one"] == heldout_prompts("one", count=64)
    for kind, held in sets.items():
        assert len({text for text, _ in held}) == 64
        assert all(caption(s) == text and parse_caption(text) == s for text, s in held)
    for n, kind in enumerate(("one", "two", "three"), 1):
        assert all(len(s.objects) == n for _, s in sets[kind])
        assert all(s.background and all(o.size and o.position for o in s.objects) for _, s in sets[kind])
    unstated = [s for _, s in sets["unstated"]]
    assert all(s.background is None or s.objects[0].size is None or s.objects[0].position is None
               for s in unstated)
    assert heldout_prompts("one", 10, seed=5) != sets["one"][:10]
    with pytest.raises(ValueError, match="kind"):
        heldout_prompts("four")
    for count in (0, 2.5, 10**6):   # 10**6 would draw for minutes before finding too few
        with pytest.raises(ValueError, match="count"):
            heldout_prompts("one", count)
    with pytest.raises(ValueError, match="seed"):
        heldout_prompts("one", 4, seed=-1)
