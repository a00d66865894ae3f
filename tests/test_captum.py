"""fastsal against Captum on the same trained weights: the Caffe net translated to PyTorch layer by layer
(fastsal.torch_port), its forward checked first, then every method against its Captum counterpart.
Skips cleanly without torch and captum (``pip install .[bench]``); CI does not install them."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
attr = pytest.importorskip("captum.attr")

import fastsal  # noqa: E402
from conftest import _input, assert_close_to_reference, conv, fc, layer, make_net, random_images  # noqa: E402
from fastsal.torch_port import deeplift_summing_unpool, to_torch  # noqa: E402

torch.set_num_threads(2)


def captum_per_class(method, x: np.ndarray, classes: np.ndarray, **kwargs) -> np.ndarray:
    """Captum's attributions (N, K, ...) for per-image classes (N, K), one target column at a time."""
    inputs = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    columns = []
    for k in range(classes.shape[1]):
        target = torch.from_numpy(classes[:, k].astype(np.int64))
        with warnings.catch_warnings():  # Captum announces its ReLU hooks with a UserWarning
            warnings.simplefilter("ignore", UserWarning)
            out = method.attribute(inputs, target=target, **kwargs)
        columns.append((out[0] if isinstance(out, tuple) else out).detach().numpy())
    return np.stack(columns, axis=1)


def assert_mostly_close(actual, expected, rtol=1e-3, fraction=0.995):
    """For the real model, whose float32 forwards in Caffe and PyTorch round differently: a rounding at a
    ReLU or max-pooling kink reroutes a few gradients, so most elements agree to rtol of the largest
    value and the values rank alike (Spearman)."""
    from scipy.stats import spearmanr

    scale = float(np.abs(expected).max())
    close = np.abs(actual - expected) <= rtol * scale
    assert close.mean() >= fraction, f"{close.mean():.4%} of elements within {rtol} of the maximum"
    assert spearmanr(actual.ravel(), expected.ravel()).statistic >= 0.999


@pytest.fixture
def translated(small_net, rng):
    net, path, score = small_net
    model = to_torch(net, path, score)
    images = random_images(rng, net, 3)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(3, 2))
    return net, model, images, classes


def test_forward_agrees(translated):
    net, model, images, _ = translated
    net.blobs["data"].reshape(*images.shape)
    caffe_out = net.forward(data=images, end=[n for n, t in net.top_names.items() if model.output in t][-1])
    expected = caffe_out[model.output].reshape(len(images), -1)
    got = model(torch.from_numpy(images)).detach().numpy().reshape(len(images), -1)
    assert_close_to_reference(got, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "method, captum_class, kwargs",
    [
        ("saliency", "Saliency", {"abs": False}),
        ("input_x_gradient", "InputXGradient", {}),
        ("guided_backprop", "GuidedBackprop", {}),
        ("deconvnet", "Deconvolution", {}),
    ],
)
def test_gradient_methods(translated, method, captum_class, kwargs):
    net, model, images, classes = translated
    expected = captum_per_class(getattr(attr, captum_class)(model), images, classes, **kwargs)
    got = fastsal.attribute(net, images, classes, method, score=model.output, reduce="none")
    assert_close_to_reference(got, expected, rtol=1e-4)


@pytest.mark.parametrize("quadrature", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients(translated, quadrature):
    net, model, images, classes = translated
    ig = attr.IntegratedGradients(model)
    baseline = np.full(images.shape[1:], 0.25, np.float32)
    expected, deltas = [], []
    for k in range(classes.shape[1]):
        a, d = ig.attribute(
            torch.from_numpy(images).requires_grad_(),
            baselines=torch.from_numpy(np.broadcast_to(baseline, images.shape).copy()),
            target=torch.from_numpy(classes[:, k].astype(np.int64)),
            n_steps=20,
            method=quadrature,
            return_convergence_delta=True,
        )
        expected.append(a.detach().numpy())
        deltas.append(d.detach().numpy())
    got, delta = fastsal.attribute(
        net,
        images,
        classes,
        "integrated_gradients",
        score=model.output,
        n_steps=20,
        quadrature=quadrature,
        baselines=baseline,
        reduce="none",
        return_convergence_delta=True,
    )
    assert_close_to_reference(got, np.stack(expected, axis=1), rtol=1e-4)
    np.testing.assert_allclose(delta, np.stack(deltas, axis=1), atol=1e-4)


def captum_deeplift(model, images, classes, baselines):
    """Captum's DeepLift (N, K, ...) and its deltas (N, K), with the two fixes fastsal.torch_port documents:
    each max pooling gets a copy of its input (else the nonlinearity below keeps the pooling's plain
    gradient) and its shares are unpooled by summing (else overlapping windows lose theirs)."""
    model = copy.deepcopy(model).copy_pooling_inputs()
    inputs = torch.from_numpy(np.ascontiguousarray(images)).requires_grad_()
    references = torch.from_numpy(np.array(np.broadcast_to(baselines, images.shape), np.float32))
    columns, deltas = [], []
    for k in range(classes.shape[1]):
        target = torch.from_numpy(classes[:, k].astype(np.int64))
        with warnings.catch_warnings(), deeplift_summing_unpool():
            warnings.simplefilter("ignore", UserWarning)  # Captum announces its hooks
            out, delta = attr.DeepLift(model).attribute(
                inputs, baselines=references, target=target, return_convergence_delta=True
            )
        columns.append(out.detach().numpy())
        deltas.append(delta.detach().numpy())
    return np.stack(columns, axis=1), np.stack(deltas, axis=1)


@pytest.mark.parametrize("baseline", ["zero", "images"])
def test_deeplift(translated, rng, baseline):
    net, model, images, classes = translated
    baselines = np.zeros_like(images) if baseline == "zero" else random_images(rng, net, len(images))
    call = dict(score=model.output, baselines=baselines, reduce="none", return_convergence_delta=True)
    if "lrn" in net.layer_dict or "emax" in net.layer_dict:  # LRN, PReLU, Eltwise MAX: no rule
        with pytest.raises(ValueError, match="method='deeplift' has no rule for layer"):
            fastsal.attribute(net, images, classes, "deeplift", **call)
        return
    expected, expected_delta = captum_deeplift(model, images, classes, baselines)
    got, delta = fastsal.attribute(net, images, classes, "deeplift", **call)
    assert_close_to_reference(got, expected, rtol=1e-4)
    np.testing.assert_allclose(delta, expected_delta, atol=1e-4)


def test_deeplift_activations_and_overlapping_max_pooling(tmp_path, rng):
    """Sigmoid (in place), TanH, ELU, then a 3x3 max pooling at stride 2, whose windows share their
    maximum: fastsal as Captum with the summing unpool, and completeness in both; Captum's own unpool
    (each position written once) loses shares there, which its convergence delta shows."""
    text = (
        _input((3, 9, 9))
        + conv("c1", "data", 4)
        + layer("sig", "Sigmoid", "c1", "c1")
        + conv("c2", "c1", 4)
        + layer("tanh", "TanH", "c2")
        + conv("c3", "tanh", 4)
        + layer("elu", "ELU", "c3", "c3", "elu_param { alpha: 0.7 }")
        + layer("pool", "Pooling", "c3", params="pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
        + fc("fc", "pool", 5)
    )
    net = make_net(tmp_path, text, seed=4)
    model = to_torch(net, str(tmp_path / "net.prototxt"), "fc")
    images = 2 * random_images(rng, net, 3)
    baselines = random_images(rng, net, 3)
    classes = rng.integers(0, 5, size=(3, 2))
    expected, expected_delta = captum_deeplift(model, images, classes, baselines)
    got, delta = fastsal.attribute(
        net, images, classes, "deeplift", baselines=baselines, reduce="none", return_convergence_delta=True
    )
    assert_close_to_reference(got, expected, rtol=1e-4)
    np.testing.assert_allclose(delta, expected_delta, atol=1e-4)
    assert np.abs(delta).max() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, unfixed = attr.DeepLift(model).attribute(
            torch.from_numpy(images).requires_grad_(),
            baselines=torch.from_numpy(baselines),
            target=torch.from_numpy(classes[:, 0].astype(np.int64)),
            return_convergence_delta=True,
        )
    assert np.abs(unfixed.detach().numpy()).max() > 100 * np.abs(delta).max() + 1e-3


@pytest.mark.parametrize(
    "method, nt_type",
    [("smoothgrad", "smoothgrad"), ("smoothgrad_sq", "smoothgrad_sq"), ("vargrad", "vargrad")],
)
def test_noise_tunnel_with_the_same_noise(translated, monkeypatch, method, nt_type):
    """Captum draws its noise with torch.normal; here it gets fastsal's documented noise instead, so
    the comparison is of the methods, not of two random draws."""
    net, model, images, classes = translated
    samples, stdev, seed = 5, 0.3, 17
    noise = np.concatenate(
        [
            np.random.default_rng([seed, n]).standard_normal((samples, *images.shape[1:]), np.float32)
            for n in range(3)
        ]
    )
    noisy = np.repeat(images, samples, axis=0) + np.float32(stdev) * noise
    monkeypatch.setattr(
        attr.NoiseTunnel, "_add_noise_to_input", staticmethod(lambda input, stdev, n: torch.from_numpy(noisy))
    )
    tunnel = attr.NoiseTunnel(attr.Saliency(model))
    expected = captum_per_class(
        tunnel, images, classes, nt_type=nt_type, nt_samples=samples, stdevs=stdev, abs=False
    )
    got = fastsal.attribute(
        net,
        images,
        classes,
        method,
        score=model.output,
        samples=samples,
        stdev=stdev,
        seed=seed,
        reduce="none",
    )
    assert_close_to_reference(got, expected, rtol=1e-4)


def cam_blob(net, score):
    return fastsal.Attribution(net, "gradcam", score=score).layer


def test_layer_gradcam(translated):
    net, model, images, classes = translated
    blob = cam_blob(net, model.output)
    expected = captum_per_class(attr.LayerGradCam(model, model.module_for(blob)), images, classes)[:, :, 0]
    got = fastsal.attribute(
        net, images, classes, "gradcam", score=model.output, layer=blob, relu=False, upsample=False
    )
    assert_close_to_reference(got, expected, rtol=1e-4)


def test_guided_gradcam(translated):
    net, model, images, classes = translated
    blob = cam_blob(net, model.output)
    expected = captum_per_class(attr.GuidedGradCam(model, model.module_for(blob)), images, classes)
    got = fastsal.attribute(
        net,
        images,
        classes,
        "guided_gradcam",
        score=model.output,
        layer=blob,
        upsample="nearest",
        reduce="none",
    )
    assert_close_to_reference(got, expected, rtol=1e-4)


@pytest.mark.slow
def test_open_nsfw_against_captum():
    """The real model: forward, then every method with a Captum counterpart, on two photos."""
    from fastsal import examples

    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    images = examples.open_nsfw_batch()[0][:2]
    model = to_torch(net, str(prototxt), "fc_nsfw")
    net.blobs["data"].reshape(*images.shape)
    scores = net.forward(data=images, end="fc_nsfw")["fc_nsfw"].copy()
    assert_close_to_reference(model(torch.from_numpy(images)).detach().numpy(), scores, rtol=1e-5)
    classes = np.array([[0, 1], [1, 0]])
    for method, captum_method, kwargs in (
        ("saliency", attr.Saliency(model), {"abs": False}),
        ("guided_backprop", attr.GuidedBackprop(model), {}),
        ("integrated_gradients", attr.IntegratedGradients(model), {"n_steps": 8}),
    ):
        expected = captum_per_class(captum_method, images, classes, **kwargs)
        options = {"n_steps": 8} if method == "integrated_gradients" else {}
        got = fastsal.attribute(net, images, classes, method, reduce="none", **options)
        assert_mostly_close(got, expected)
    deeplift, _ = captum_deeplift(model, images, classes, 0.0)
    got = fastsal.attribute(net, images, classes, "deeplift", reduce="none")
    for n in range(len(images)):  # per map
        for k in range(classes.shape[1]):
            assert_mostly_close(got[n, k], deeplift[n, k], fraction=0.99)
    blob = fastsal.Attribution(net, "gradcam").layer
    expected = captum_per_class(attr.LayerGradCam(model, model.module_for(blob)), images, classes)[:, :, 0]
    got = fastsal.attribute(net, images, classes, "gradcam", layer=blob, relu=False, upsample=False)
    assert_mostly_close(got, expected)
