import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.shapes.evaluate import ATTRIBUTES, attribute_accuracy, read_scene, read_scenes
from fastdiff.shapes.render import (COLOURS, SYMMETRY, Obj, Scene, batch_tensors, caption, realise, render,
                                    render_batch, sample_scene)


def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng) for _ in range(2000)]
    return scenes, render_batch(scenes)


def test_reads_rendered_scenes(rendered):
    scenes, images = rendered
    result = attribute_accuracy(images, scenes)
    assert result["overall"] >= 0.99, result
    assert min(result[a] for a in ATTRIBUTES) >= 0.98, result


def test_reads_rendered_scenes_after_jpeg(rendered):
    scenes, images = rendered
    result = attribute_accuracy(np.stack([jpeg(im) for im in images]), scenes)
    assert result["overall"] >= 0.97, result
    assert min(result[a] for a in ATTRIBUTES) >= 0.95, result


def test_prompts_and_scenes_score_alike():
    images, captions = batch_tensors(50, np.random.default_rng(9))
    assert attribute_accuracy(images, captions)["exact"] == 1.0


def test_reads_turns_and_details(rendered):
    scenes, images = rendered
    errors = []
    for want, got in zip(scenes[:300], read_scenes(images[:300])):
        for o in want.objects:
            (match,) = [g for g in got.objects if (g.colour, g.shape, g.position) == (o.colour, o.shape, o.position)]
            assert np.hypot(match.centre[0] - o.centre[0], match.centre[1] - o.centre[1]) < 0.5
            assert abs(match.diameter - o.diameter) < 0.06 * o.diameter
            period = SYMMETRY[o.shape]
            errors.append(abs((match.angle - o.angle + period / 2) % period - period / 2))
    assert np.mean(errors) < 2.5 and np.max(errors) <= 10  # turns are tried 5° apart


def test_every_input_form_reads_the_same():
    scene = realise(Scene("gray", [Obj("triangle", "purple", "large", "bottom left"),
                                   Obj("circle", "cyan", "small", "right")]), 0)
    image = render(scene)
    array = np.asarray(image)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    forms = [image, array, array / 255.0, tensor, tensor.float() / 255, tensor.float() / 127.5 - 1,
             image.resize((128, 128), Image.NEAREST)]
    for form in forms:
        got = read_scene(form)
        assert got.background == "gray" and sorted(map(caption_of, got.objects)) == sorted(map(caption_of, scene.objects))
    assert read_scenes(torch.stack([tensor, tensor]).float() / 127.5 - 1) == [read_scene(image)] * 2


def caption_of(obj):
    return caption(Scene("black", [obj]))


def test_wrong_colour_lowers_accuracy():
    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng, objects=1) for _ in range(40)]
    names = list(COLOURS)

    def recoloured(s):
        o = s.objects[0]
        other = next(c for c in names[names.index(o.colour) + 1:] + names if c not in (o.colour, s.background))
        return Scene(s.background, [Obj(o.shape, other, o.size, o.position, o.centre, o.diameter, o.angle)])

    right = attribute_accuracy(render_batch(scenes), scenes)
    wrong = attribute_accuracy(render_batch([recoloured(s) for s in scenes]), scenes)
    assert right["colour"] == 1.0 and wrong["colour"] == 0.0
    assert wrong["overall"] < right["overall"]
    assert wrong["shape"] == wrong["size"] == wrong["position"] == 1.0


def test_blank_image_reads_as_no_object():
    for name, rgb in COLOURS.items():
        assert read_scene(Image.new("RGB", (64, 64), rgb)) == Scene(name, [])
    result = attribute_accuracy([Image.new("RGB", (64, 64), COLOURS["white"])],
                                ["a small red circle on the left, white background"])
    assert result["background"] == 1.0 and result["count"] == 0.0
    assert result["colour"] == result["shape"] == result["size"] == result["position"] == 0.0
    assert result["overall"] == pytest.approx(1 / 5)


def test_objects_match_by_best_assignment():
    a, b = Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "top right")
    c = Obj("triangle", "green", "small", "bottom")
    drawn = realise(Scene("white", [c, b, a]), 3)
    assert attribute_accuracy([render(drawn)], [Scene("white", [a, b, c])])["exact"] == 1.0  # any order
    # one object missing: two thirds of the object attributes, background still right
    result = attribute_accuracy([render(Scene("white", drawn.objects[1:]))], [Scene("white", [a, b, c])])
    assert result["colour"] == pytest.approx(2 / 3) and result["background"] == 1.0 and result["count"] == 0.0


def test_only_stated_attributes_are_scored():
    drawn = realise(Scene("white", [Obj("circle", "red", "large", "left")]), 4)
    image = render(drawn)
    # the same picture judged against a prompt that leaves size, position and background free
    result = attribute_accuracy([image], ["a red circle"])
    assert result["exact"] == 1.0 and result["overall"] == 1.0
    # a wrong statement counts only where it is made
    result = attribute_accuracy([image], ["a small red circle"])
    assert result["size"] == 0.0 and result["overall"] == pytest.approx(2 / 3)
    result = attribute_accuracy([image], ["a red circle on the right, white background"])
    assert result["position"] == 0.0 and result["background"] == 1.0 and result["overall"] == pytest.approx(3 / 4)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="pictures"):
        attribute_accuracy([Image.new("RGB", (64, 64))], [])


def test_pictures_with_nan_are_refused():
    """A sampler that breaks down gives NaN pictures; read as black they would score (the Fréchet
    distance rated them under a good sampler's), so every measure refuses them."""
    from fastdiff.shapes.metrics import coverage, frechet_distance, prompt_accuracy

    good = batch_tensors(4, 0)[0]
    bad = good.clone()
    bad[1, 0, 5, 5] = float("nan")
    prompts = ["a red circle"] * 4
    for measure in (lambda x: prompt_accuracy(x, prompts), lambda x: coverage(x, prompts),
                    lambda x: frechet_distance(x, good), lambda x: frechet_distance(good, x)):
        with pytest.raises(ValueError, match="a picture holds NaN"):
            measure(bad)
