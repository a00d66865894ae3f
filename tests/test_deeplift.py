"""method="deeplift" (the Rescale rule) against a reference written from its formula: pycaffe forwards the
input and the baseline, NumPy computes each nonlinearity's multiplier and backpropagates; completeness;
the baseline forms; bad input. Captum's DeepLift on the same weights: tests/test_captum.py."""

from __future__ import annotations

import numpy as np
import pytest

import fastsal
from conftest import (
    NETS,
    _input,
    assert_close_to_reference,
    conv,
    conv_matrix,
    fc,
    layer,
    make_net,
    random_images,
)

EPS = 1e-10  # Captum's: below this |x - x0| the multiplier is the derivative

# conv, ReLU in place, an overlapping max pooling (3x3, stride 2: windows share rows and columns, and
# Caffe's last window is clipped), a ReLU and a 1x1 convolution summed (Caffe splits the pooling's
# output), TanH, inner product.
RESCALE_NET = (
    _input((2, 8, 8))
    + conv("conv1", "data", 3)
    + layer("relu1", "ReLU", "conv1", "conv1")
    + layer("pool", "Pooling", "conv1", "pooled", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
    + conv("conv2", "pooled", 4)
    + layer("relu2", "ReLU", "conv2", "act2")
    + conv("conv3", "pooled", 4, k=1, pad=0)
    + layer("sum", "Eltwise", ["act2", "conv3"])
    + layer("tanh", "TanH", "sum", "bent")
    + fc("fc", "bent", 3)
)


def multiplier(f, derivative, x, x0):
    """The Rescale rule's (f(x) - f(x0)) / (x - x0), f'(x) where |x - x0| < eps."""
    delta = x - x0
    safe = np.where(np.abs(delta) < EPS, 1.0, delta)
    return np.where(np.abs(delta) < EPS, derivative(x), (f(x) - f(x0)) / safe)


def relu_multiplier(x, x0):
    return multiplier(lambda v: np.maximum(v, 0), lambda v: (v > 0).astype(float), x, x0)


def tanh_multiplier(x, x0):
    return multiplier(np.tanh, lambda v: 1 - np.tanh(v) ** 2, x, x0)


def max_pool_rule(x, x0, g, k=3, stride=2):
    """Captum's max-pooling rule on (C, H, W): per window, y - r (the maxima of x and x0) goes to x's first
    maximum where y >= r, else to x0's; each position's sum divided by x - x0 there (the gradient where
    |x - x0| < eps). Windows as Caffe's: ceil rounding, clipped at the edge."""
    c, h, w = x.shape
    out_h, out_w = g.shape[1:]
    share = np.zeros_like(x)
    gradient = np.zeros_like(x)
    for ch in range(c):
        for i in range(out_h):
            for j in range(out_w):
                rows = slice(i * stride, min(i * stride + k, h))
                cols = slice(j * stride, min(j * stride + k, w))
                window, reference = x[ch, rows, cols], x0[ch, rows, cols]
                mine = np.unravel_index(np.argmax(window), window.shape)  # the first maximum, as Caffe's
                theirs = np.unravel_index(np.argmax(reference), reference.shape)
                y, r = window[mine], reference[theirs]
                at = (ch, rows.start + mine[0], cols.start + mine[1])
                gradient[at] += g[ch, i, j]
                if y >= r:
                    share[at] += g[ch, i, j] * (y - r)
                else:
                    share[ch, rows.start + theirs[0], cols.start + theirs[1]] += g[ch, i, j] * (y - r)
    delta = x - x0
    small = np.abs(delta) < EPS
    return np.where(small, gradient, share / np.where(small, 1.0, delta))


def blobs_of(net, image):
    """The blobs of one image as float64, conv1 before its in-place ReLU."""
    net.blobs["data"].reshape(1, *image.shape)
    net.forward(data=image[None], end="conv1")
    values = {"conv1": net.blobs["conv1"].data[0].astype(np.float64)}
    net.forward(data=image[None])
    for name in ("pooled", "conv2", "conv3", "sum", "bent"):
        values[name] = net.blobs[name].data[0].astype(np.float64)
    values["relu1"] = net.blobs["conv1"].data[0].astype(np.float64)
    return values


def rescale_reference(net, image, baseline, classes):
    """(K, C, H, W): (x - x0) times the multipliers' chain, backpropagated layer by layer with NumPy."""
    a, b = blobs_of(net, image), blobs_of(net, baseline)
    weights = {
        name: net.params[name][0].data.astype(np.float64) for name in ("conv1", "conv2", "conv3", "fc")
    }
    m1 = conv_matrix(weights["conv1"], image.shape, 1, 1)
    m2 = conv_matrix(weights["conv2"], a["pooled"].shape, 1, 1)
    m3 = conv_matrix(weights["conv3"], a["pooled"].shape, 0, 1)
    out = []
    for c in classes:
        g = weights["fc"][c].reshape(a["bent"].shape) * tanh_multiplier(a["sum"], b["sum"])
        g_pooled = (m2.T @ (g * relu_multiplier(a["conv2"], b["conv2"])).ravel()) + m3.T @ g.ravel()
        g_pooled = g_pooled.reshape(a["pooled"].shape)
        g_relu1 = max_pool_rule(a["relu1"], b["relu1"], g_pooled)
        g_conv1 = g_relu1 * relu_multiplier(a["conv1"], b["conv1"])
        g_data = (m1.T @ g_conv1.ravel()).reshape(image.shape)
        out.append((image.astype(np.float64) - baseline) * g_data)
    return np.stack(out)


@pytest.mark.parametrize("baseline", ["zero", "image"])
def test_rescale_rule_matches_its_formula(tmp_path, rng, baseline):
    net = make_net(tmp_path, RESCALE_NET, seed=3)
    images = random_images(rng, net, 3)
    baselines = np.zeros_like(images) if baseline == "zero" else random_images(rng, net, 3)
    classes = [2, 0]
    got = fastsal.attribute(
        net, images, classes, "deeplift", baselines=baselines, reduce="none", batch_size=2
    )
    assert got.shape == (3, 2, 2, 8, 8)
    for n in range(3):
        expected = rescale_reference(net, images[n], baselines[n].astype(np.float64), classes)
        assert_close_to_reference(got[n], expected, rtol=1e-5)
    # Caffe's own layers under the rule give the same numbers.
    slow = fastsal.Attribution(net, "deeplift", baselines=baselines, reduce="none", fast_layers=False)
    np.testing.assert_allclose(slow.compute(images, classes), got, rtol=1e-5, atol=1e-7 * np.abs(got).max())


def test_completeness(tmp_path, rng):
    """sum(attributions) = F(x) - F(x0) per (image, class): the convergence delta is within 1e-5 of
    max(1, |F(x) - F(x0)|), on a ReLU net without max pooling (BatchNorm, Scale, Eltwise, average
    pooling) and on the max-pooling net above (the rule conserves the difference there too)."""
    for text in (NETS["resnet_block_bn_scale_eltwise"][0], RESCALE_NET):
        net = make_net(tmp_path, text, seed=5)
        images = 2 * random_images(rng, net, 4)
        baseline = rng.standard_normal(images.shape[1:]).astype(np.float32)
        score = fastsal.Saliency(net).score
        classes = np.arange(net.blobs[score].data[0].size)
        raw, delta = fastsal.attribute(
            net, images, classes, "deeplift", baselines=baseline, reduce="none", return_convergence_delta=True
        )
        net.blobs["data"].reshape(*images.shape)
        at_images = net.forward(data=images, end=score)[score].copy()
        gap = at_images - net.forward(data=np.broadcast_to(baseline, images.shape), end=score)[score]
        assert np.abs(gap).max() > 0.1  # a clear difference to conserve
        np.testing.assert_allclose(delta, raw.reshape(*delta.shape, -1).sum(axis=2) - gap, atol=1e-5)
        assert (np.abs(delta) <= 1e-5 * np.maximum(1, np.abs(gap))).all(), (delta, gap)


def test_baseline_forms_and_reductions_agree(tmp_path, rng):
    net = make_net(tmp_path, RESCALE_NET, seed=3)
    images = random_images(rng, net, 3)
    per_channel = np.array([0.5, -0.25], np.float32)
    image_shaped = np.broadcast_to(per_channel[:, None, None], images.shape[1:])
    raw = fastsal.attribute(net, images, [0, 1], "deeplift", baselines=image_shaped, reduce="none")
    for form in (per_channel, per_channel[:, None, None], np.broadcast_to(image_shaped, images.shape)):
        np.testing.assert_array_equal(
            fastsal.attribute(net, images, [0, 1], "deeplift", baselines=form, reduce="none"), raw
        )
    assert not np.allclose(raw, fastsal.attribute(net, images, [0, 1], "deeplift", reduce="none"))
    np.testing.assert_allclose(
        fastsal.attribute(net, images, [0, 1], "deeplift", baselines=per_channel), np.abs(raw).max(axis=2)
    )
    np.testing.assert_allclose(
        fastsal.attribute(net, images, [0, 1], "deeplift", baselines=per_channel, reduce="sum"),
        raw.sum(axis=2),
        rtol=1e-5,
        atol=1e-6 * np.abs(raw).max(),
    )
    # The batch's reference and input forwards serve every class: K at once equals one class at a time.
    np.testing.assert_allclose(
        raw[:, 1], fastsal.attribute(net, images, 1, "deeplift", baselines=per_channel, reduce="none")[:, 0]
    )
    # Top-k ranks on the clean images (the input forward's scores).
    attribution = fastsal.Attribution(net, "deeplift", baselines=per_channel, reduce="none")
    maps, top = attribution.compute_top_k(images, 2)
    np.testing.assert_array_equal(top, np.argsort(-attribution.scores(images), axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(maps, attribution.compute(images, top))
    with_delta, top_again, delta = attribution.compute_top_k(images, 2, return_convergence_delta=True)
    np.testing.assert_array_equal(top_again, top)
    np.testing.assert_array_equal(with_delta, maps)
    np.testing.assert_array_equal(delta, attribution.compute(images, top, return_convergence_delta=True)[1])


@pytest.mark.parametrize("method", ["deeplift", "integrated_gradients", "occlusion"])
def test_per_channel_baselines_follow_net_reshape(tmp_path, rng, method):
    """One value per channel fits every image size: after net.reshape() to a new size, the maps of an
    Attribution built then with those values spread over the new image (they were kept as the old
    size's image and refused)."""
    net = make_net(tmp_path, NETS["resnet_block_bn_scale_eltwise"][0], seed=4)
    per_channel = np.array([0.5, -0.25, 1.0], np.float32)
    attribution = fastsal.Attribution(net, method, baselines=per_channel)
    attribution.compute(random_images(rng, net, 2), [0, 1])
    net.blobs["data"].reshape(2, 3, 12, 12)
    net.reshape()
    images = random_images(rng, net, 2)
    spread = np.broadcast_to(per_channel[:, None, None], (3, 12, 12))
    expected = fastsal.Attribution(net, method, baselines=spread).compute(images, [0, 1])
    np.testing.assert_array_equal(attribution.compute(images, [0, 1]), expected)


def test_engine_counts_the_kept_values(tmp_path):
    """The batch sizing counts what the rule layers keep between the forwards and the backwards: one float
    per activation input, and per max pooling its input plus three per output (r and the two shares, or
    the reference's argmax)."""
    net = make_net(tmp_path, RESCALE_NET, seed=3)
    plain = fastsal.Saliency(net).bytes_per_image
    deeplift = fastsal.Attribution(net, "deeplift")._input.bytes_per_image
    kept = 3 * 64 + 4 * 16 + 4 * 16  # relu1, relu2, tanh inputs
    kept += 3 * 64 + 3 * (3 * 16)  # the max pooling
    assert deeplift - plain == 4 * kept


def test_bad_input_is_refused_and_loses_nothing(tmp_path, rng):
    net = make_net(tmp_path, RESCALE_NET, seed=3)
    images = random_images(rng, net, 2)
    with pytest.raises(
        ValueError, match=r"baselines must be a scalar, one value per channel \(2,\), a \(2, 8, 8\)"
    ):
        fastsal.Attribution(net, "deeplift", baselines=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="baselines contain NaN"):
        fastsal.Attribution(net, "deeplift", baselines=np.nan)
    with pytest.raises(ValueError, match="method='deeplift' runs on the CPU only"):
        fastsal.Attribution(net, "deeplift", device=0)
    with pytest.raises(TypeError, match="method 'deeplift' takes no option 'n_steps'"):
        fastsal.Attribution(net, "deeplift", n_steps=5)
    attribution = fastsal.Attribution(net, "deeplift", baselines=np.zeros((3, 2, 8, 8)))
    with pytest.raises(ValueError, match="baselines has 3 images but there are 2"):
        attribution.compute(images, 0)
    for text, name, kind in (
        (NETS["inception_concat_lrn_no_softmax"][0], "lrn", "LRN"),
        (NETS["eltwise_max_prod_sigmoid_tanh"][0], "emax", "Eltwise"),
    ):
        other = make_net(tmp_path, text)
        with pytest.raises(
            ValueError, match=f"method='deeplift' has no rule for layer '{name}' \\({kind}\\)"
        ):
            fastsal.attribute(other, random_images(rng, other, 1), 0, "deeplift")
    with pytest.raises(ValueError, match=r"baselines\[1\] overflows float32 inside the net"):
        fastsal.attribute(
            net, images, 0, "deeplift", baselines=np.stack([images[0], np.full_like(images[1], 3e38)])
        )
    # The refusals left the net and the engines whole.
    good = fastsal.Attribution(net, "deeplift")
    first = good.compute(images, [0, 1])
    np.testing.assert_array_equal(good.compute(images, [0, 1]), first)
    assert np.isfinite(first).all() and np.abs(first).max() > 0


def test_cli_run_method_deeplift(model, tmp_path, rng):
    """fastsal run --method deeplift: the store holds what attribute() gives for the same preprocessed
    images (baseline 0 after preprocessing, as integrated gradients')."""
    import zarr
    from PIL import Image

    from fastsal import cli

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "maps.zarr"
    prototxt, weights = model
    words = ["run", str(folder), "--model-def", prototxt, "--pretrained-model", weights, "-o", str(out)]
    words += ["--method", "deeplift", "--reduce", "sum", "--mean-value", "104,117,123", "--quiet"]
    assert cli.main(words) == 0
    store = zarr.open_group(str(out), mode="r")
    preprocessing = fastsal.Preprocessing((3, 32, 32), mean=np.array([104.0, 117.0, 123.0], np.float32))
    inputs = np.stack([preprocessing(fastsal.load_image(str(p))) for p in store["paths"][:]])
    net = fastsal.load(prototxt, weights)
    expected = fastsal.attribute(net, inputs, store["classes"][:], method="deeplift", reduce="sum")
    np.testing.assert_allclose(store["maps"][:], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
