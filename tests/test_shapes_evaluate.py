import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.shapes.evaluate import ATTRIBUTES, attribute_accuracy, read_scene, read_scenes
from fastdiff.shapes.render import COLOURS, Obj, Scene, batch_tensors, caption, render, render_batch, sample_scene


def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng, two_objects_prob=0.5) for _ in range(2000)]
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


def test_every_input_form_reads_the_same():
    scene = Scene("gray", [Obj("triangle", "purple", "large", "bottom left"), Obj("circle", "cyan", "small", "right")])
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
    scenes = [sample_scene(rng, two_objects_prob=0.0) for _ in range(40)]
    names = list(COLOURS)

    def recoloured(s):
        o = s.objects[0]
        other = next(c for c in names[names.index(o.colour) + 1:] + names if c not in (o.colour, s.background))
        return Scene(s.background, [Obj(o.shape, other, o.size, o.position, o.offset)])

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


def test_two_objects_match_by_best_assignment():
    a, b = Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "top right")
    image = render(Scene("white", [b, a]))  # read in any order
    assert attribute_accuracy([image], [Scene("white", [a, b])])["exact"] == 1.0
    # one object missing: half the object attributes, background still right
    result = attribute_accuracy([render(Scene("white", [a]))], [Scene("white", [a, b])])
    assert result["colour"] == 0.5 and result["background"] == 1.0 and result["count"] == 0.0


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="pictures"):
        attribute_accuracy([Image.new("RGB", (64, 64))], [])
