"""The attribution methods against references written from their formulas with pycaffe + NumPy (the seed
recipe's gradients, NumPy for the rest), against finite differences (IG completeness), and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

import fastsal
from conftest import (
    NETS,
    _input,
    assert_close_to_reference,
    conv,
    fc,
    force_backward_copy,
    layer,
    make_net,
    producer_layer,
    random_images,
    seed_recipe,
)


def per_row_gradients(net, path, rows, classes, score):
    """Raw input gradients (M, K, C, H, W) of rows (M, C, H, W) for classes (M, K), by the seed recipe."""
    return seed_recipe(net, path, rows, classes, score)[1].astype(np.float64)


def reduce_like(raw, reduce):
    if reduce == "none":
        return raw
    if reduce == "sum":
        return raw.sum(axis=2)
    return np.abs(raw).max(axis=2)


@pytest.mark.parametrize("reduce", ["absmax", "sum", "none"])
def test_saliency_and_input_x_gradient(small_net, rng, reduce):
    net, path, score = small_net
    images = random_images(rng, net, 3)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(3, 2))
    grads = per_row_gradients(net, path, images, classes, score)
    saliency = fastsal.attribute(net, images, classes, "saliency", reduce=reduce, batch_size=2)
    assert_close_to_reference(saliency, reduce_like(grads, reduce))
    ixg = fastsal.attribute(net, images, classes, "input_x_gradient", reduce=reduce, batch_size=2)
    assert_close_to_reference(ixg, reduce_like(grads * images[:, None], reduce))


def noisy_rows(images, samples, seed, sigmas):
    """The noise fastsal documents: image n's samples from default_rng([seed, n]), sigma per image."""
    rows = []
    for n, image in enumerate(images):
        noise = np.random.default_rng([seed, n]).standard_normal((samples, *image.shape), np.float32)
        rows.append(image + np.float32(sigmas[n]) * noise)
    return np.concatenate(rows)


@pytest.mark.parametrize("method", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("batch_size", [2, 5], ids=["B2", "B5"])
def test_noise_methods_match_their_formulas(small_net, rng, method, batch_size):
    """The same noise fed to the reference: mean of a, mean of a^2, mean of a^2 - mean(a)^2."""
    net, path, score = small_net
    images = random_images(rng, net, 3)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(3, 2))
    samples, level = 4, 0.2
    sigmas = [level * (image.max() - image.min()) for image in images]
    rows = noisy_rows(images, samples, 7, sigmas)
    g = per_row_gradients(net, path, rows, np.repeat(classes, samples, axis=0), score)
    g = g.reshape(3, samples, *g.shape[1:])
    expected = {
        "smoothgrad": g.mean(axis=1),
        "smoothgrad_sq": (g**2).mean(axis=1),
        "vargrad": (g**2).mean(axis=1) - g.mean(axis=1) ** 2,
    }[method]
    attribution = fastsal.Attribution(
        net, method, samples=samples, noise_level=level, seed=7, batch_size=batch_size
    )
    raw = fastsal.Attribution(net, method, samples=samples, noise_level=level, seed=7, reduce="none")
    assert_close_to_reference(raw.compute(images, classes), expected, rtol=1e-4)
    assert_close_to_reference(attribution.compute(images, classes), np.abs(expected).max(axis=2), rtol=1e-4)


def test_noise_is_reproducible_and_independent_of_batch_size(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 5)
    maps = [
        fastsal.Attribution(net, "smoothgrad", samples=6, seed=3, batch_size=b).compute(images, [0, 4])
        for b in (1, 4, 16)
    ]
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps[0], maps[2], rtol=1e-5, atol=1e-7)
    other = fastsal.Attribution(net, "smoothgrad", samples=6, seed=4).compute(images, [0, 4])
    assert np.abs(other - maps[0]).max() > 1e-4
    stdev = fastsal.Attribution(net, "smoothgrad", samples=6, seed=3, stdev=0.0).compute(images, [0, 4])
    np.testing.assert_allclose(stdev, fastsal.compute(net, images, [0, 4]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "quadrature", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
)
def test_integrated_gradients_match_their_formula(small_net, rng, quadrature):
    net, path, score = small_net
    images = random_images(rng, net, 2)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(2, 2))
    baseline = rng.standard_normal(images.shape[1:]).astype(np.float32) * 0.1
    steps = 5
    if quadrature == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
    else:
        rule = quadrature.split("_")[1]
        h = 1 / steps
        alphas = {
            "left": np.arange(steps) * h,
            "right": np.arange(1, steps + 1) * h,
            "middle": (np.arange(steps) + 0.5) * h,
            "trapezoid": np.linspace(0, 1, steps),
        }[rule]
        weights = np.full(steps, h)
        if rule == "trapezoid":
            weights[[0, -1]] /= 2
    rows = np.concatenate([baseline + a * (image - baseline) for image in images for a in alphas]).reshape(
        -1, *images.shape[1:]
    )
    g = per_row_gradients(net, path, rows.astype(np.float32), np.repeat(classes, steps, axis=0), score)
    g = g.reshape(2, steps, *g.shape[1:])
    expected = np.einsum("s,nskchw->nkchw", weights, g) * (images - baseline)[:, None]
    ig = fastsal.Attribution(
        net,
        "integrated_gradients",
        n_steps=steps,
        quadrature=quadrature,
        baselines=baseline,
        reduce="none",
        batch_size=3,
    )
    assert_close_to_reference(ig.compute(images, classes), expected)


def test_integrated_gradients_completeness_on_a_smooth_net(tmp_path, rng):
    """|sum(attr) - (F(x) - F(baseline))| < 1e-3 |F(x) - F(baseline)| at n_steps=50 on a net with no kinks."""
    text = (
        _input((2, 6, 6))
        + conv("conv", "data", 4)
        + layer("tanh", "TanH", "conv")
        + layer("pool", "Pooling", "tanh", params="pooling_param { pool: AVE kernel_size: 2 stride: 2 }")
        + fc("hidden", "pool", 8)
        + layer("sig", "Sigmoid", "hidden")
        + fc("score", "sig", 3)
    )
    net = make_net(tmp_path, text, seed=11)
    images = 3 * random_images(rng, net, 4)
    maps, delta = fastsal.attribute(
        net, images, [0, 1, 2], "integrated_gradients", return_convergence_delta=True
    )
    assert maps.shape == (4, 3, 6, 6) and delta.shape == (4, 3)
    net.blobs["data"].reshape(*images.shape)
    at_images = net.forward(data=images)["score"].copy()  # a view of the blob: copy before the next forward
    gap = at_images - net.forward(data=np.zeros_like(images))["score"]
    clear = np.abs(gap) > 1e-2  # float32 scores: a relative bound means something on clear gaps
    assert clear.sum() >= 10
    assert (np.abs(delta[clear]) < 1e-3 * np.abs(gap[clear])).all(), (delta, gap)
    # The delta is what its definition says: the raw attributions' sum minus the score difference.
    raw = fastsal.attribute(net, images, [0, 1, 2], "integrated_gradients", reduce="none")
    np.testing.assert_allclose(delta, raw.reshape(4, 3, -1).sum(axis=2) - gap, atol=1e-5)


def cam_reference(net, path, images, classes, score, blob, plus=False, relu=True):
    """Grad-CAM from its formula: the blob's values and gradient through pycaffe (backward stopped after
    the blob's last writer), weights = spatial mean (Grad-CAM) or pytorch-grad-cam's (Grad-CAM++)."""
    reference = force_backward_copy(net, path)
    names = list(reference._layer_names)
    last = producer_layer(reference, score)
    stop = names[names.index(producer_layer(reference, blob)) + 1]
    reference.blobs["data"].reshape(1, *images.shape[1:])
    reference.reshape()
    cams = []
    for n, image in enumerate(images):
        reference.blobs["data"].data[0] = image
        reference.forward(end=last)
        acts = reference.blobs[blob].data[0].astype(np.float64).copy()
        row = []
        for c in classes[n]:
            reference.blobs[score].diff[...] = 0
            reference.blobs[score].diff.reshape(1, -1)[0, c] = 1
            reference.backward(start=last, end=stop)
            grad = reference.blobs[blob].diff[0].astype(np.float64)
            if plus:
                alpha = grad**2 / (2 * grad**2 + acts.sum(axis=(1, 2))[:, None, None] * grad**3 + 1e-6)
                alpha = np.where(grad != 0, alpha, 0)
                weights = (np.maximum(grad, 0) * alpha).sum(axis=(1, 2))
            else:
                weights = grad.mean(axis=(1, 2))
            cam = np.tensordot(weights, acts, axes=1)
            row.append(np.maximum(cam, 0) if relu else cam)
        cams.append(row)
    return np.array(cams)


CAM_NET = (
    _input((3, 12, 12))
    + conv("conv1", "data", 6)
    + layer("relu1", "ReLU", "conv1", "conv1")
    + layer("pool1", "Pooling", "conv1", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    + conv("conv2", "pool1", 8)
    + layer("relu2", "ReLU", "conv2", "conv2")
    + layer("gap", "Pooling", "conv2", params="pooling_param { pool: AVE global_pooling: true }")
    + fc("fc", "gap", 5)
    + layer("prob", "Softmax", "fc")
)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("blob", ["conv2", "conv1", "pool1"])
def test_gradcam_matches_its_formula(tmp_path, rng, method, blob):
    net = make_net(tmp_path, CAM_NET, seed=5)
    path = str(tmp_path / "net.prototxt")
    images = random_images(rng, net, 3)
    classes = rng.integers(0, 5, size=(3, 2))
    reference = cam_reference(net, path, images, classes, "fc", blob, plus=method == "gradcam++")
    small = fastsal.Attribution(net, method, layer=blob, upsample=False, batch_size=2)
    assert small.layer == blob
    assert_close_to_reference(small.compute(images, classes), reference)
    signed = fastsal.Attribution(net, method, layer=blob, upsample=False, relu=False)
    assert_close_to_reference(
        signed.compute(images, classes),
        cam_reference(net, path, images, classes, "fc", blob, method == "gradcam++", False),
    )
    # Upsampled bilinearly (half-pixel centres, edges clamped), as scikit-image's order-1 resize does.
    big = fastsal.Attribution(net, method, layer=blob).compute(images, classes)
    expected = np.stack(
        [[resize(m, (12, 12), order=1, mode="edge", anti_aliasing=False) for m in r] for r in reference]
    )
    assert_close_to_reference(big, expected)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "inexact"])
@pytest.mark.parametrize("blob", ["conv1", "branch_a", "sum"])
def test_gradcam_through_folded_batch_norm(tmp_path, rng, blob, exact):
    """A BatchNorm + Scale in place on a convolution fold into its weights (saliency_net.cpp) only where
    all three run: Grad-CAM at a chain's blob still gets the values and gradient after the whole chain,
    also when the inexact forward folds them."""
    text, score = NETS["resnet_block_bn_scale_eltwise"]
    net = make_net(tmp_path, text, seed=5)
    images = random_images(rng, net, 3)
    classes = rng.integers(0, 5, size=(3, 2))
    reference = cam_reference(net, str(tmp_path / "net.prototxt"), images, classes, score, blob)
    # fp32 backward throughout: the fold's arithmetic is checked at 1e-4 (bf16 is tested on its own)
    cam = fastsal.Attribution(net, "gradcam", layer=blob, upsample=False, exact=exact, _bf16_backward=False)
    assert_close_to_reference(cam.compute(images, classes), reference)


def test_gradcam_default_layer_is_the_last_spatial_blob(tmp_path):
    net = make_net(tmp_path, CAM_NET)
    assert fastsal.Attribution(net, "gradcam").layer == "conv2"  # not gap: 1x1


@pytest.mark.parametrize("rule", ["guided_backprop", "deconvnet"])
def test_relu_rules_match_their_formula(tmp_path, rng, rule):
    """A reference written with NumPy layer by layer: conv, ReLU (with the rule's backward), max pooling,
    leaky ReLU (its own gradient, untouched by the rule), inner product."""
    text = (
        _input((2, 8, 8))
        + conv("conv", "data", 3)
        + layer("relu", "ReLU", "conv", "conv")
        + layer("pool", "Pooling", "conv", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        + conv("conv2", "pool", 4)
        + layer("leaky", "ReLU", "conv2", "conv2", "relu_param { negative_slope: 0.2 }")
        + fc("fc", "conv2", 3)
    )
    net = make_net(tmp_path, text, seed=2)
    images = random_images(rng, net, 2)
    got = fastsal.attribute(net, images, [0, 2], rule, reduce="none")
    fast_off = fastsal.Attribution(net, rule, reduce="none", fast_layers=False).compute(images, [0, 2])
    np.testing.assert_allclose(got, fast_off, rtol=1e-5, atol=1e-7)
    w1, b1 = (p.data.astype(np.float64) for p in net.params["conv"])
    w2, b2 = (p.data.astype(np.float64) for p in net.params["conv2"])
    wf, bf = (p.data.astype(np.float64) for p in net.params["fc"])

    def conv_forward(x, w, b):
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        out = np.empty((w.shape[0], x.shape[1], x.shape[2]))
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                out[:, i, j] = np.tensordot(w, padded[:, i : i + 3, j : j + 3], axes=3) + b
        return out

    def conv_backward(g, w, shape):
        padded = np.zeros((shape[0], shape[1] + 2, shape[2] + 2))
        for i in range(shape[1]):
            for j in range(shape[2]):
                padded[:, i : i + 3, j : j + 3] += np.tensordot(g[:, i, j], w, axes=1)
        return padded[:, 1:-1, 1:-1]

    for n, x in enumerate(images.astype(np.float64)):
        a1 = conv_forward(x, w1, b1)
        r1 = np.maximum(a1, 0)
        windows = r1.reshape(3, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(3, 4, 4, 4)
        arg = windows.argmax(axis=3)
        p = windows.max(axis=3)
        a2 = conv_forward(p, w2, b2)
        for k, c in enumerate([0, 2]):
            g2 = (wf[c].reshape(4, 4, 4)) * np.where(a2 > 0, 1.0, 0.2)  # leaky: its own gradient
            gp = conv_backward(g2, w2, p.shape)
            gr = np.zeros((3, 4, 4, 4))
            np.put_along_axis(gr, arg[..., None], gp[..., None], axis=3)
            gr = gr.reshape(3, 4, 4, 2, 2).transpose(0, 1, 3, 2, 4).reshape(3, 8, 8)
            rule_grad = gr * (gr > 0) * ((a1 > 0) if rule == "guided_backprop" else 1)
            expected = conv_backward(rule_grad, w1, x.shape)
            assert_close_to_reference(got[n, k], expected)


def test_guided_gradcam_is_guided_backprop_times_gradcam(tmp_path, rng):
    net = make_net(tmp_path, CAM_NET, seed=5)
    images = random_images(rng, net, 2)
    guided = fastsal.attribute(net, images, [1, 3], "guided_backprop", reduce="none")
    cams = fastsal.attribute(net, images, [1, 3], "gradcam", layer="conv2", upsample="nearest")
    expected = guided * cams[:, :, None]
    got = fastsal.attribute(
        net, images, [1, 3], "guided_gradcam", layer="conv2", upsample="nearest", reduce="none"
    )
    assert_close_to_reference(got, expected)
    assert_close_to_reference(
        fastsal.attribute(net, images, [1, 3], "guided_gradcam", layer="conv2", upsample="nearest"),
        np.abs(expected).max(axis=2),
    )


def test_top_k_is_ranked_on_the_clean_image(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 3)
    attribution = fastsal.Attribution(net, "smoothgrad", samples=3, seed=1)
    maps, classes = attribution.compute_top_k(images, 2)
    _, expected = fastsal.compute_top_k(net, images, 2)
    np.testing.assert_array_equal(classes, expected)
    np.testing.assert_array_equal(maps, attribution.compute(images, classes))


def test_single_image_and_scores(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 2)
    attribution = fastsal.Attribution(net, "integrated_gradients", n_steps=4)
    np.testing.assert_allclose(
        attribution.compute(images[1], [2, 3]), attribution.compute(images, [2, 3])[1], rtol=1e-6
    )
    net.blobs["data"].reshape(*images.shape)
    np.testing.assert_allclose(
        attribution.scores(images), net.forward(data=images, end="fc")["fc"], rtol=1e-6
    )


def test_memory_stays_bounded_by_the_batch(tmp_path, rng):
    """Samples and steps go through the batch: the internal net never holds more than batch_size rows."""
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    attribution = fastsal.Attribution(net, "integrated_gradients", n_steps=50, batch_size=4)
    engine = attribution._input._engine
    attribution.compute(random_images(rng, net, 3), [0, 1])
    assert attribution._input.batch_size == 4 and engine.batch_size == 4


@pytest.mark.parametrize("method, option", [("integrated_gradients", "n_steps"), ("vargrad", "samples")])
def test_an_images_samples_stream_in_batches(tmp_path, rng, method, option):
    """More samples than a batch: an image's rows are made and sent a batch at a time, summed across
    calls in one accumulator, so host memory does not grow with the number of samples or steps."""
    import tracemalloc

    text = (
        _input((3, 64, 64))
        + conv("conv1", "data", 4)
        + layer("relu1", "ReLU", "conv1", "conv1")
        + fc("fc", "conv1", 5)
    )
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 2)
    seed = {"seed": 0} if method == "vargrad" else {}
    peaks = []
    for count in (40, 400):
        attribution = fastsal.Attribution(net, method, **{option: count}, batch_size=4, **seed)
        attribution.compute(images, [0, 3])  # warm: the engine's blobs
        tracemalloc.start()
        maps = attribution.compute(images, [0, 3])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        whole = fastsal.Attribution(net, method, **{option: count}, batch_size=count, **seed)
        np.testing.assert_allclose(maps, whole.compute(images, [0, 3]), rtol=1e-5, atol=1e-7)
    assert peaks[1] < 1.5 * peaks[0], peaks  # 400 steps' inputs alone would be 19 MB


# ---- bad input ----


@pytest.mark.parametrize(
    "method, options, error, message",
    [
        ("smoothgrad", {"samples": 0}, ValueError, "samples must be a positive integer, got 0"),
        ("smoothgrad", {"samples": 2.5}, ValueError, "samples must be a positive integer"),
        ("smoothgrad", {"stdev": -1.0}, ValueError, "stdev must be a number >= 0"),
        ("smoothgrad", {"noise_level": float("nan")}, ValueError, "noise_level must be a number >= 0"),
        ("smoothgrad", {"stdev": 0.1, "noise_level": 0.1}, ValueError, "not both"),
        ("smoothgrad", {"seed": -3}, ValueError, "seed must be None or an integer"),
        ("integrated_gradients", {"n_steps": 0}, ValueError, "n_steps must be a positive integer"),
        ("integrated_gradients", {"n_steps": 1, "quadrature": "riemann_left"}, ValueError, "at least 2"),
        ("integrated_gradients", {"quadrature": "simpson"}, ValueError, "quadrature must be one of"),
        (
            "integrated_gradients",
            {"baselines": np.zeros((3, 5, 5))},
            ValueError,
            r"baselines must be a scalar, one value per channel \(3,\), a \(3, 12, 12\)",
        ),
        (
            "integrated_gradients",
            {"baselines": np.full((3, 12, 12), np.nan)},
            ValueError,
            "baselines contain NaN",
        ),
        ("saliency", {"reduce": "mean"}, ValueError, "reduce must be one of absmax, sum, none"),
        ("saliency", {"samples": 3}, TypeError, "method 'saliency' takes no option 'samples'"),
        ("gradcam", {"layer": "nowhere"}, ValueError, "unknown layer blob 'nowhere'"),
        (
            "gradcam",
            {"layer": "fc"},
            ValueError,
            "layer blob 'fc' is the score blob itself; Grad-CAM needs a blob before it",
        ),
        ("gradcam", {"layer": "data"}, ValueError, "layer blob 'data' is the input blob itself"),
        ("gradcam", {"upsample": "cubic"}, ValueError, "upsample must be 'bilinear', 'nearest' or False"),
        ("guided_gradcam", {"upsample": False}, ValueError, "upsample cannot be False"),
    ],
)
def test_bad_options(tmp_path, method, options, error, message):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    with pytest.raises(error, match=message):
        fastsal.Attribution(net, method, **options)


def test_bad_calls_lose_nothing(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 2)
    with pytest.raises(ValueError, match="unknown method 'lime'"):
        fastsal.Attribution(net, "lime")
    gradcam_net = make_net(tmp_path, CAM_NET)
    with pytest.raises(ValueError, match="layer blob 'fc' is the score blob itself"):
        fastsal.Attribution(gradcam_net, "gradcam", layer="fc")
    ig = fastsal.Attribution(net, "integrated_gradients", n_steps=3, baselines=np.zeros((3, 3, 12, 12)))
    with pytest.raises(ValueError, match="baselines has 3 images but there are 2"):
        ig.compute(images, 0)
    with pytest.raises(
        ValueError, match="return_convergence_delta is for method=.integrated_gradients. or .deeplift. only"
    ):
        fastsal.Attribution(net, "saliency").compute(images, 0, return_convergence_delta=True)
    with pytest.raises(ValueError, match=r"class 9 \(classes\[0, 0\]\) is out of range"):
        fastsal.attribute(net, images, 9, "smoothgrad")
    bad = images.copy()
    bad[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"images\[1\] contains NaN or Inf"):
        fastsal.attribute(net, bad, 0, "integrated_gradients")
    np.testing.assert_array_equal(
        fastsal.attribute(net, images, 0, "saliency"), fastsal.compute(net, images, 0)
    )


def test_gradient_blob_needs_no_gradient_below_it(tmp_path, rng):
    """Grad-CAM at a blob above a layer without an input gradient: only the backward's layers are checked."""
    text = (
        _input((1, 6, 6))
        + layer("thr", "Threshold", "data", params="threshold_param { threshold: 0.0 }")
        + conv("conv", "thr", 4)
        + fc("fc", "conv", 3)
    )
    net = make_net(tmp_path, text)
    with pytest.raises(ValueError, match=r"layer 'thr' \(Threshold\) has no gradient"):
        fastsal.Attribution(net, "saliency")
    maps = fastsal.Attribution(net, "gradcam", layer="conv", upsample=False).compute(
        random_images(rng, net, 2), 1
    )
    assert maps.shape == (2, 1, 6, 6)
