"""fastsal.metrics against references written from the papers: RISE's deletion and insertion games as a
slow pycaffe loop (one net.forward per perturbed image), on the small nets with seeded weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal

import fastsal
from conftest import producer_layer, random_images

TOL = 1e-4


def probabilities(net, score, image) -> np.ndarray:
    """The class probabilities of one image through pycaffe: softmax of the score blob, in float64."""
    net.blobs["data"].reshape(1, *image.shape)
    out = net.forward(data=image[None], end=producer_layer(net, score))[score].reshape(-1).astype(np.float64)
    e = np.exp(out - out.max())
    return e / e.sum()


def rise_blur(image, klen=11, sigma=5.0):
    """RISE's substrate: gkern (a delta smoothed by gaussian_filter), each channel convolved with zero fill."""
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    kernel = scipy.ndimage.gaussian_filter(delta, sigma)
    return np.stack(
        [scipy.signal.convolve2d(c, kernel, mode="same", boundary="fill", fillvalue=0) for c in image]
    ).astype(np.float32)


def causal_reference(net, score, images, classes, maps, mode, step, baseline=0.0):
    """RISE's CausalMetric from the paper, one image at a time: pixels in decreasing order of the map
    (ties: the lower flat index first), step at a time, moved from start to finish; the class
    probability before each step and after the last; the trapezoid area over [0, 1]."""
    n, c, h, w = images.shape
    hw = h * w
    n_steps = (hw + step - 1) // step
    curves = np.empty((*classes.shape, n_steps + 1))
    for i, image in enumerate(images):
        for k, label in enumerate(classes[i]):
            order = np.argsort(-maps[i, k].reshape(-1), kind="stable")
            if mode == "deletion":
                current, finish = image.copy(), np.broadcast_to(np.float32(baseline), image.shape)
            else:
                current, finish = rise_blur(image), image
            for s in range(n_steps + 1):
                curves[i, k, s] = probabilities(net, score, current)[label]
                coords = order[step * s : step * (s + 1)]
                current.reshape(c, hw)[:, coords] = finish.reshape(c, hw)[:, coords]
    auc = (curves.sum(-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (curves.shape[-1] - 1)
    return auc, curves


@pytest.fixture
def case(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 3)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(3, 2))
    maps = rng.standard_normal((3, 2, *images.shape[2:])).astype(np.float32)
    return net, score, images, classes, maps


@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
def test_deletion_and_insertion_match_the_rise_reference(case, tied):
    net, score, images, classes, maps = case
    if tied:  # a few levels only: the ranking's tie rule decides which pixels go first
        maps = np.round(maps)
    step = 7  # does not divide H * W: the last step moves fewer pixels
    got = fastsal.evaluate(
        net,
        images,
        classes,
        [fastsal.metrics.Deletion(step=step, baseline=0.5), fastsal.metrics.Insertion(step=step)],
        maps=maps,
        score=score,
        batch_size=5,  # batches straddle pairs and the two metrics
    )
    for mode, baseline in (("deletion", 0.5), ("insertion", None)):
        auc, curves = causal_reference(net, score, images, classes, maps, mode, step, baseline)
        np.testing.assert_allclose(got[f"{mode}_curve"], curves, atol=TOL)
        np.testing.assert_allclose(got[mode], auc, atol=TOL)
    assert got["deletion_curve"].shape[-1] == -(-images.shape[2] * images.shape[3] // step) + 1


def test_deletion_of_a_method_s_maps_and_the_default_step(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0], [1]])
    got = fastsal.evaluate(
        net, images, classes, "deletion", method="smoothgrad", samples=3, seed=4, score=score
    )
    maps = fastsal.attribute(net, images, classes, "smoothgrad", samples=3, seed=4, score=score)
    auc, curves = causal_reference(net, score, images, classes, maps, "deletion", images.shape[-1])
    np.testing.assert_allclose(got["deletion_curve"], curves, atol=TOL)
    np.testing.assert_allclose(got["deletion"], auc, atol=TOL)
    assert set(got) == {"deletion", "deletion_curve"}


def test_integrated_gradients_convergence_delta_is_relative(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0, 1], [2, 0]])
    got = fastsal.evaluate(
        net,
        images,
        classes,
        "insertion",
        method="integrated_gradients",
        n_steps=8,
        convergence_delta=True,
        score=score,
    )
    _, delta = fastsal.attribute(
        net, images, classes, "integrated_gradients", n_steps=8, score=score, return_convergence_delta=True
    )
    reference = []
    for i, image in enumerate(images):
        net.blobs["data"].reshape(1, *image.shape)
        end = producer_layer(net, score)
        fx = net.forward(data=image[None], end=end)[score].reshape(-1).astype(np.float64)
        fb = net.forward(data=np.zeros_like(image)[None], end=end)[score].reshape(-1).astype(np.float64)
        reference.append(np.abs(delta[i]) / np.abs(fx[classes[i]] - fb[classes[i]]))
    np.testing.assert_allclose(got["convergence_delta"], np.array(reference), rtol=1e-4, atol=1e-6)


def test_refusals(case):
    net, score, images, classes, maps = case
    with pytest.raises(ValueError, match="unknown metric 'delete'"):
        fastsal.evaluate(net, images, classes, "delete", maps=maps, score=score)
    with pytest.raises(ValueError, match="maps must be"):
        fastsal.evaluate(net, images, classes, "deletion", maps=maps[:, :1], score=score)
    with pytest.raises(ValueError, match="NaN"):
        fastsal.evaluate(net, images, classes, "deletion", maps=np.full_like(maps, np.nan), score=score)
    with pytest.raises(TypeError, match="a method's"):
        fastsal.evaluate(net, images, classes, "deletion", maps=maps, score=score, samples=3)
    with pytest.raises(ValueError, match="step must be at least 1"):
        fastsal.metrics.Deletion(step=0)
    with pytest.raises(ValueError, match="baseline must be"):
        fastsal.evaluate(
            net, images, classes, fastsal.metrics.Deletion(baseline=np.zeros(3)), maps=maps, score=score
        )
    with pytest.raises(ValueError, match="once"):
        fastsal.evaluate(net, images, classes, ["deletion", "deletion"], maps=maps, score=score)
