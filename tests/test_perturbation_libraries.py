"""The perturbation methods against their reference libraries on the same weights (fastsal.torch_port):
Captum's Occlusion, pytorch-grad-cam's ScoreCAM and AblationCAM. Skips cleanly without torch, captum
or grad-cam; CI does not install them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
attr = pytest.importorskip("captum.attr")

import fastsal  # noqa: E402
from conftest import assert_close_to_reference, random_images, spearman  # noqa: E402
from fastsal.torch_port import to_torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def translated(small_net, rng):
    net, path, score = small_net
    model = to_torch(net, path, score)
    images = random_images(rng, net, 3)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(3, 2))
    return net, model, images, classes


def per_class(run, classes: np.ndarray) -> np.ndarray:
    """A library's maps (N, K, ...) for per-image classes (N, K), one column of targets at a time."""
    return np.stack([run(classes[:, k]) for k in range(classes.shape[1])], axis=1)


def test_occlusion_agrees_with_captum(translated):
    net, model, images, classes = translated
    channels = images.shape[1]
    options = {"sliding_window_shapes": (channels, 4, 3), "strides": (channels, 2, 2), "baselines": 0.5}
    occlusion = attr.Occlusion(model)
    inputs = torch.from_numpy(images)

    def captum(targets):
        return occlusion.attribute(inputs, target=torch.from_numpy(targets), **options).numpy()

    got = fastsal.attribute(net, images, classes, "occlusion", score=model.output, reduce="none", **options)
    assert_close_to_reference(got, per_class(captum, classes))


def grad_cam(method, model, layer, images, classes, **kwargs):
    cam_module = pytest.importorskip("pytorch_grad_cam")
    targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    cam = getattr(cam_module, method)(model=model, target_layers=[model.module_for(layer)], **kwargs)
    inputs = torch.from_numpy(images)

    def run(targets):
        with warnings.catch_warnings():  # its progress bars and torch's hooks may warn
            warnings.simplefilter("ignore")
            return cam(
                input_tensor=inputs, targets=[targets_module.ClassifierOutputTarget(int(c)) for c in targets]
            )

    return per_class(run, classes)


@pytest.mark.parametrize(("method", "library"), [("scorecam", "ScoreCAM"), ("ablationcam", "AblationCAM")])
def test_cams_agree_with_pytorch_grad_cam(translated, method, library):
    net, model, images, classes = translated
    attribution = fastsal.Attribution(net, method, score=model.output)
    # batch_size=1: pytorch-grad-cam's AblationLayer lowers the fill by 1e7 per row of its batch where
    # the activations' minimum is not 0; one row per batch is its documented min - 1e7, fastsal's.
    kwargs = {"batch_size": 1} if method == "ablationcam" else {}
    bottoms = [b for key, b, tops in model.steps if attribution.layer in tops][-1]
    if method == "ablationcam" and len(bottoms) > 1:
        pytest.skip("pytorch-grad-cam's AblationLayer replaces a module of one input; this layer has several")
    expected = grad_cam(library, model, attribution.layer, images, classes, **kwargs)
    assert np.abs(expected).max() > 0
    assert_close_to_reference(attribution.compute(images, classes), expected)


@pytest.mark.slow
def test_open_nsfw_against_the_libraries():
    """The real model, one photo: occlusion (Captum) and Score-CAM (pytorch-grad-cam) rank alike."""
    from fastsal import examples

    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    images = examples.open_nsfw_batch()[0][:1]
    model = to_torch(net, str(prototxt), "fc_nsfw")
    classes = np.array([[1]])
    options = {"sliding_window_shapes": (3, 45, 45), "strides": (3, 30, 30)}
    expected = per_class(
        lambda t: (
            attr.Occlusion(model)
            .attribute(torch.from_numpy(images), target=torch.from_numpy(t), **options)
            .numpy()
        ),
        classes,
    )
    got = fastsal.attribute(net, images, classes, "occlusion", reduce="none", **options)
    assert spearman(got, expected) >= 0.999
    attribution = fastsal.Attribution(net, "scorecam", batch_size=16)
    expected = grad_cam("ScoreCAM", model, attribution.layer, images, classes)
    assert spearman(attribution.compute(images, classes), expected) >= 0.999
