"""The field's known results, as fastsal.evaluate gives them on a real trained net: a small CNN that
Caffe's own solver trains on scikit-learn's digits (fastsal.examples.digits_net). Gradient maps beat a
random map on deletion and insertion (Petsiuk et al.); under cascading randomisation the gradient's and
SmoothGrad's maps decorrelate while guided backprop's stay similar (Adebayo et al.)."""

from __future__ import annotations

import numpy as np
import pytest

import fastsal
from fastsal import examples, metrics

pytest.importorskip("sklearn")

IMAGES = 100  # held-out digits the metrics average over
# Each comparison is paired over the digits and must clear three standard errors of the mean paired
# difference: a chance difference passes that one time in several hundred, a reversed ordering never.
STANDARD_ERRORS = 3
BEATS_RANDOM = [
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("smoothgrad", {"samples": 25, "seed": 0}),
    ("integrated_gradients", {}),
    ("guided_backprop", {}),
    ("lrp", {"composite": "epsilon_plus_flat"}),
    ("deeplift", {}),
    ("scorecam", {}),
    ("occlusion", {"sliding_window_shapes": (5, 5), "strides": 2}),  # a stroke is about 4 pixels wide
]  # Grad-CAM, guided Grad-CAM and Ablation-CAM beat it on deletion, not on insertion: left out


def clears(difference: np.ndarray) -> bool:
    """Whether the mean of paired differences (larger is the expected direction) exceeds
    STANDARD_ERRORS standard errors of that mean."""
    difference = np.asarray(difference, np.float64).ravel()
    error = difference.std(ddof=1) / np.sqrt(len(difference))
    return difference.mean() > STANDARD_ERRORS * error


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits net trained afresh by Caffe's solver, and the first IMAGES held-out digits with the
    class the net predicts for each."""
    files = examples.digits_net(tmp_path_factory.mktemp("digits"))
    net = fastsal.load(*files)
    _, _, test_images, test_labels = examples.digits_data()
    predicted = fastsal.Attribution(net, "saliency").scores(test_images).argmax(axis=1)
    accuracy = float(np.mean(predicted == test_labels))
    print(f"digits net: {accuracy:.1%} of {len(test_labels)} held-out digits")
    return net, test_images[:IMAGES], predicted[:IMAGES, None], accuracy, files


def test_caffe_s_solver_trains_the_digits_net(digits):
    """Ten classes (chance 10%): a net that learnt the digits gets at least 90% of the held-out ones.
    A second call with the same folder and arguments reuses the files instead of training again."""
    *_, accuracy, files = digits
    assert accuracy >= 0.9, accuracy
    written = [path.stat().st_mtime_ns for path in files]
    again = examples.digits_net(files[0].parent)
    assert again == files and [path.stat().st_mtime_ns for path in again] == written


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"iterations": 0}, ValueError, "iterations must be at least 1, got 0"),
        ({"iterations": 2.5}, TypeError, "iterations must be an integer"),
        ({"seed": -1}, ValueError, "seed must be at least 0, got -1"),
        ({"iterations": 2**31}, ValueError, "iterations must be at most 2147483647"),  # Caffe's int32
        ({"seed": 2**63}, ValueError, "seed must be at most 9223372036854775807"),  # Caffe's int64
    ],
)
def test_digits_net_refuses_bad_options_before_caffe_sees_them(tmp_path, options, error, match):
    with pytest.raises(error, match=match):
        examples.digits_net(tmp_path, **options)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def random_scores(digits):
    net, images, classes, *_ = digits
    maps = np.random.default_rng(0).random((*classes.shape, *images.shape[2:]), dtype=np.float32)
    return fastsal.evaluate(net, images, classes, ["deletion", "insertion"], maps=maps)


@pytest.mark.parametrize("method, options", BEATS_RANDOM, ids=[m for m, _ in BEATS_RANDOM])
def test_gradient_methods_beat_a_random_map_on_deletion_and_insertion(digits, random_scores, method, options):
    """RISE's protocol at the default step (a row of pixels, 33 points): the method's pixels, most
    important first, erase the digit's evidence sooner (lower deletion AUC) and restore it sooner from
    the blurred digit (higher insertion AUC) than a uniform random order. The same map negated, least
    important first, scores worse than random on both: the curves follow the order they are given."""
    net, images, classes, *_ = digits
    maps = fastsal.Attribution(net, method, **options).compute(images, classes)
    pixel = maps.sum(axis=2) if maps.ndim == 5 else maps
    for order, sign in (("most important first", 1), ("least important first", -1)):
        got = fastsal.evaluate(net, images, classes, ["deletion", "insertion"], maps=sign * pixel)
        deletion = sign * (random_scores["deletion"] - got["deletion"])
        insertion = sign * (got["insertion"] - random_scores["insertion"])
        assert clears(deletion), (order, got["deletion"].mean(), random_scores["deletion"].mean())
        assert clears(insertion), (order, got["insertion"].mean(), random_scores["insertion"].mean())


def test_cascading_randomisation_decorrelates_gradients_not_guided_backprop(digits):
    """MPRT, every layer re-drawn from the top (seed 42), Spearman of |map| with the trained net's.
    Once every layer is random, the gradient's and SmoothGrad's maps resemble their originals less
    than the original map of another digit does; guided backprop's stay more similar than theirs at
    every stage, and with the top layers random (all but the first convolution) more similar to their
    originals than another digit's map is."""
    net, images, classes, *_ = digits
    stages, similarity, other_digit = None, {}, {}
    for method, options in (
        ("saliency", {}),
        ("smoothgrad", {"samples": 25, "seed": 0}),
        ("guided_backprop", {}),
    ):
        got = fastsal.evaluate(
            net, images, classes, metrics.MPRT(similarities=["spearman_abs"]), method=method, **options
        )
        stages = list(got["mprt_layers"])
        similarity[method] = got["mprt_spearman_abs"][:, 0]  # (images, stages), top down
        maps = np.abs(fastsal.Attribution(net, method, **options).compute(images, classes)[:, 0])
        flat = metrics.ranks(maps.reshape(len(maps), -1))
        other_digit[method] = metrics.rank_correlation(flat, np.roll(flat, 1, axis=0))
    assert stages == list(reversed(list(net.params))), stages
    for method in ("saliency", "smoothgrad"):
        assert clears(other_digit[method] - similarity[method][:, -1]), method
        for stage in range(len(stages)):
            assert clears(similarity["guided_backprop"][:, stage] - similarity[method][:, stage]), (
                method,
                stage,
            )
    assert clears(similarity["guided_backprop"][:, -2] - other_digit["guided_backprop"])
