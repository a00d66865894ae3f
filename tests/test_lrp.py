"""LRP (method="lrp") against a NumPy reference written from each rule's formula: every layer of two tiny
nets as a dense matrix, the activations from pycaffe's forward, the relevance propagated layer by layer in
float64. Then conservation, the products' engine (oneDNN's log), and the errors the method gives instead
of wrong maps."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastsal
from conftest import _input, conv, conv_matrix, fc, layer, make_net, write
from fastsal import lrp

# A sum of two convolutions (Caffe splits the input between them), ReLU, average pooling, a product.
SUM_NET = (
    _input((2, 6, 6))
    + conv("conv_a", "data", 3)
    + conv("conv_b", "data", 3, k=1, pad=0)
    + layer("sum", "Eltwise", ["conv_a", "conv_b"])
    + layer("relu", "ReLU", "sum", "act")
    + layer("pool", "Pooling", "act", "pooled", "pooling_param { pool: AVE kernel_size: 2 stride: 2 }")
    + fc("fc", "pooled", 4)
)
# Max pooling between a convolution (stride 2) and the product.
MAX_NET = (
    _input((2, 8, 8))
    + conv("conv1", "data", 3, stride=2)
    + layer("relu", "ReLU", "conv1", "act")
    + layer("pool", "Pooling", "act", "pooled", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    + fc("fc", "pooled", 4)
)


def average_matrix(shape, k):
    c, h, w = shape
    m = np.zeros((c, h // k, w // k, c, h, w))
    for ch in range(c):
        for y in range(h // k):
            for x in range(w // k):
                m[ch, y, x, ch, y * k : y * k + k, x * k : x * k + k] = 1.0 / (k * k)
    return m.reshape(c * (h // k) * (w // k), c * h * w)


def stabilize(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def reference_linear(rule: lrp.Rule, m, b, x, r, ones=None):
    """R_in of one linear layer (matrix m, bias b) for input x and output relevance r, from the formulas;
    ones: the layer's matrix with every weight 1 (a convolution's connections), for the flat rule."""
    eps = rule.epsilon
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    mp, mn = np.maximum(m, 0), np.minimum(m, 0)
    bp, bn = np.maximum(b, 0), np.minimum(b, 0)
    if rule.name == "epsilon":
        return x * (m.T @ (r / stabilize(m @ x + b, eps)))
    if rule.name == "zplus":
        s = r / stabilize(mp @ xp + bp + mn @ xn, eps)
        return xp * (mp.T @ s) + xn * (mn.T @ s)
    if rule.name == "alpha_beta":
        sp = r / stabilize(mp @ xp + bp + mn @ xn, eps)
        sn = r / stabilize(mn @ xp + bn + mp @ xn, eps)
        return rule.alpha * (xp * (mp.T @ sp) + xn * (mn.T @ sp)) - rule.beta * (
            xp * (mn.T @ sn) + xn * (mp.T @ sn)
        )
    if rule.name == "gamma":
        g = rule.gamma
        mgp, mgn, bgp, bgn = m + g * mp, m + g * mn, b + g * bp, b + g * bn
        z = m @ x + b
        sp = np.where(z > 0, r / stabilize(mgp @ xp + bgp + mgn @ xn, eps), 0)
        sn = np.where(z < 0, r / stabilize(mgn @ xp + bgn + mgp @ xn, eps), 0)
        return xp * (mgp.T @ sp + mgn.T @ sn) + xn * (mgn.T @ sp + mgp.T @ sn)
    if rule.name == "zbox":
        low, high = np.full_like(x, rule.low), np.full_like(x, rule.high)
        s = r / stabilize(m @ x + b - (mp @ low + bp) - (mn @ high + bn), eps)
        return x * (m.T @ s) - low * (mp.T @ s) - high * (mn.T @ s)
    if rule.name == "flat":
        ones = np.ones_like(m) if ones is None else ones
        return ones.T @ (r / stabilize(ones @ np.ones_like(x), eps))
    if rule.name == "wsquare":
        return (m**2).T @ (r / stabilize(m**2 @ np.ones_like(x) + b**2, eps))
    raise AssertionError(rule.name)


def params(net, name):
    blobs = net.params[name]
    return blobs[0].data.astype(np.float64), blobs[1].data.astype(np.float64)


def reference_sum_net(net, images, classes, rule, fc_rule):
    """The relevance of SUM_NET's input: rule on both convolutions, Norm on the sum and the pooling, Pass on
    the ReLU, fc_rule on the product."""
    wa, ba = params(net, "conv_a")
    wb, bb = params(net, "conv_b")
    wf, bf = params(net, "fc")
    ma, mb = conv_matrix(wa, (2, 6, 6), 1, 1), conv_matrix(wb, (2, 6, 6), 0, 1)
    pool = average_matrix((3, 6, 6), 2)
    ones_a, ones_b = (
        conv_matrix(np.ones_like(wa), (2, 6, 6), 1, 1),
        conv_matrix(np.ones_like(wb), (2, 6, 6), 0, 1),
    )
    out = np.zeros((*classes.shape, 2 * 6 * 6))
    for n, image in enumerate(images.astype(np.float64)):
        x = image.ravel()
        a, b = ma @ x + np.repeat(ba, 36), mb @ x + np.repeat(bb, 36)
        act = np.maximum(a + b, 0)
        pooled = pool @ act
        for k, c in enumerate(classes[n]):
            r = np.eye(4)[c]
            r = reference_linear(fc_rule, wf, bf, pooled, r)
            r = act * (pool.T @ (r / stabilize(pooled, 1e-6)))  # Norm on the average pooling
            share = r / stabilize(a + b, 1e-6)  # Pass on the ReLU, then Norm on the sum
            ra, rb = a * share, b * share
            out[n, k] = reference_linear(rule, ma, np.repeat(ba, 36), x, ra, ones_a) + reference_linear(
                rule, mb, np.repeat(bb, 36), x, rb, ones_b
            )
    return out.reshape(*classes.shape, 2, 6, 6)


def reference_max_net(net, images, classes, rule, fc_rule):
    w1, b1 = params(net, "conv1")
    wf, bf = params(net, "fc")
    m1 = conv_matrix(w1, (2, 8, 8), 1, 2)
    ones1 = conv_matrix(np.ones_like(w1), (2, 8, 8), 1, 2)
    out = np.zeros((*classes.shape, 2 * 8 * 8))
    for n, image in enumerate(images.astype(np.float64)):
        x = image.ravel()
        act = np.maximum(m1 @ x + np.repeat(b1, 16), 0).reshape(3, 4, 4)
        # the winner of each 2 x 2 window (Caffe's: the first maximum in row-major order)
        windows = act.reshape(3, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(3, 2, 2, 4)
        winner = windows.argmax(axis=-1)
        pooled = windows.max(axis=-1).ravel()
        for k, c in enumerate(classes[n]):
            r_pooled = reference_linear(fc_rule, wf, bf, pooled, np.eye(4)[c]).reshape(3, 2, 2)
            r_act = np.zeros((3, 4, 4))
            for ch, y, xx in np.ndindex(3, 2, 2):
                dy, dx = divmod(winner[ch, y, xx], 2)
                r_act[ch, 2 * y + dy, 2 * xx + dx] = r_pooled[ch, y, xx]
            out[n, k] = reference_linear(rule, m1, np.repeat(b1, 16), x, r_act.ravel(), ones1)
    return out.reshape(*classes.shape, 2, 8, 8)


RULES = {
    "epsilon": lrp.epsilon(0.05),
    "zplus": lrp.zplus(),
    "alpha2_beta1": lrp.alpha_beta(2, 1),
    "alpha1_beta0": lrp.alpha_beta(1, 0),
    "gamma": lrp.gamma(0.25),
    "zbox": lrp.zbox(-3.0, 3.0),
    "flat": lrp.flat(),
    "wsquare": lrp.wsquare(),
}


@pytest.mark.parametrize("fc_rule", ["epsilon", "gamma", "alpha2_beta1"])
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("which", ["sum", "max"])
def test_rules_against_numpy(tmp_path, rng, rule, fc_rule, which):
    text, reference = (SUM_NET, reference_sum_net) if which == "sum" else (MAX_NET, reference_max_net)
    net = make_net(tmp_path, text, seed=3)
    images = rng.standard_normal((3, *net.blobs["data"].data.shape[1:])).astype(np.float32)
    classes = rng.integers(0, 4, size=(3, 2))
    convs = ["conv_a", "conv_b"] if which == "sum" else ["conv1"]
    composite = {name: RULES[rule] for name in convs}
    composite.update(fc=RULES[fc_rule], ReLU="pass", Eltwise="norm", Pooling="norm")
    ours = fastsal.attribute(net, images, classes, method="lrp", composite=composite, reduce="none")
    expected = reference(net, images, classes, RULES[rule], RULES[fc_rule])
    scale = np.abs(expected).reshape(*classes.shape, -1).max(axis=2)[..., None, None, None]
    assert (scale > 0).all()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * scale.max())
    assert np.all(np.abs(ours - expected) <= 1e-4 * scale)


# Two convolutions, the second behind a ReLU (an input with no negative value: the rules' one-sided
# products) and in two groups or one (Caffe's products or oneDNN's), then a product.
def deep_net(groups):
    return (
        _input((2, 6, 6))
        + conv("conv1", "data", 4)
        + layer("relu1", "ReLU", "conv1", "act1")
        + conv("conv2", "act1", 4, group=groups)
        + layer("relu2", "ReLU", "conv2", "act2")
        + fc("fc", "act2", 4)
    )


def grouped_conv_matrix(weights, in_shape, pad, stride, groups):
    """A grouped convolution as a dense matrix: one conv_matrix per group, on the block diagonal."""
    c, h, w = in_shape
    per_out, per_in = len(weights) // groups, c // groups
    blocks = [
        conv_matrix(weights[g * per_out : (g + 1) * per_out], (per_in, h, w), pad, stride)
        for g in range(groups)
    ]
    rows, cols = blocks[0].shape
    m = np.zeros((rows * groups, cols * groups))
    for g, block in enumerate(blocks):
        m[g * rows : (g + 1) * rows, g * cols : (g + 1) * cols] = block
    return m


def reference_deep_net(net, images, classes, rule, fc_rule, groups):
    w1, b1 = params(net, "conv1")
    w2, b2 = params(net, "conv2")
    wf, bf = params(net, "fc")
    m1, m2 = conv_matrix(w1, (2, 6, 6), 1, 1), grouped_conv_matrix(w2, (4, 6, 6), 1, 1, groups)
    ones1 = conv_matrix(np.ones_like(w1), (2, 6, 6), 1, 1)
    ones2 = grouped_conv_matrix(np.ones_like(w2), (4, 6, 6), 1, 1, groups)
    out = np.zeros((*classes.shape, 2 * 6 * 6))
    for n, image in enumerate(images.astype(np.float64)):
        x = image.ravel()
        act1 = np.maximum(m1 @ x + np.repeat(b1, 36), 0)
        act2 = np.maximum(m2 @ act1 + np.repeat(b2, 36), 0)
        for k, c in enumerate(classes[n]):
            r = reference_linear(fc_rule, wf, bf, act2, np.eye(4)[c])  # Pass on the ReLUs
            r = reference_linear(rule, m2, np.repeat(b2, 36), act1, r, ones2)
            out[n, k] = reference_linear(rule, m1, np.repeat(b1, 36), x, r, ones1)
    return out.reshape(*classes.shape, 2, 6, 6)


@pytest.mark.parametrize("path", ["onednn", "onednn_forward", "caffe"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_rules_behind_a_relu_against_numpy(tmp_path, rng, rule, groups, path):
    """The one-sided products (an input with no negative value) and the two-sided ones, oneDNN's stacked
    products (one group; with exact=False its forward too) and Caffe's, with 3 images a batch (blocks
    regrouped per image) and 1."""
    net = make_net(tmp_path, deep_net(groups), seed=5)
    images = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    classes = rng.integers(0, 4, size=(3, 2))
    composite = {"conv1": RULES[rule], "conv2": RULES[rule], "fc": RULES["epsilon"], "ReLU": "pass"}
    expected = reference_deep_net(net, images, classes, RULES[rule], RULES["epsilon"], groups)
    scale = np.abs(expected).reshape(*classes.shape, -1).max(axis=2)[..., None, None, None]
    assert (scale > 0).all()
    engine = {"fast_layers": path != "caffe", "exact": path != "onednn_forward"}
    for batch_size in (3, 1):
        attribution = fastsal.Attribution(
            net, "lrp", composite=composite, reduce="none", batch_size=batch_size, **engine
        )
        ours = attribution.compute(images, classes)
        assert np.all(np.abs(ours - expected) <= 1e-4 * scale), (rule, batch_size)


PRODUCTS_LOG = """
import sys
import numpy as np
import caffe
import fastsal
fastsal.set_caffe_log_level(2)
net = caffe.Net(sys.argv[1], caffe.TEST)
images = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
composite = {"Convolution": fastsal.lrp.gamma(0.25), "InnerProduct": fastsal.lrp.epsilon(), "ReLU": "pass"}
attribution = fastsal.Attribution(net, "lrp", composite=composite)
attribution.compute(images, [0, 1])
print("SECOND", flush=True)
attribution.compute(images, [2, 3])
"""


@pytest.mark.skipif(not fastsal.build_info()["onednn_isa"], reason="built without oneDNN")
def test_rule_products_are_onednn_convolutions_with_weights_laid_out_once(tmp_path):
    """The issue's "modified weights computed once per engine, not per call": oneDNN's log shows the
    rules' convolutions (forward and data backward) in both calls, and reorders of 3x3 weights in the
    first only."""
    net_text = (
        _input((3, 8, 8))
        + conv("conv1", "data", 16)
        + layer("relu1", "ReLU", "conv1", "act1")
        + conv("conv2", "act1", 16)
        + layer("relu2", "ReLU", "conv2", "act2")
        + fc("fc", "act2", 4)
    )
    env = dict(os.environ, DNNL_VERBOSE="1", ONEDNN_VERBOSE="1")
    result = subprocess.run(
        [sys.executable, "-c", PRODUCTS_LOG, write(tmp_path, net_text)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = result.stdout.split("SECOND", 1)

    def executed(log):
        kinds = []
        for line in log.splitlines():
            fields = line.split(",")
            if len(fields) > 6 and fields[1] == "exec":
                weights = fields[3] == "reorder" and line.rstrip().rsplit(",", 2)[-2].endswith("x3x3")
                kinds.append("weights" if weights else f"{fields[3]} {fields[5]}")
        return kinds

    for log in (first, second):
        kinds = executed(log)
        assert "convolution forward_inference" in kinds and "convolution backward_data" in kinds, kinds
    assert "weights" in executed(first)
    assert "weights" not in executed(second)


def test_reduce_sum_is_the_default_and_batches_agree(tmp_path, rng):
    net = make_net(tmp_path, SUM_NET, seed=3)
    images = rng.standard_normal((5, 2, 6, 6)).astype(np.float32)
    raw = fastsal.attribute(net, images, [0, 2, 3], method="lrp", reduce="none")
    maps = fastsal.Attribution(net, "lrp", batch_size=2).compute(images, [0, 2, 3])
    np.testing.assert_allclose(maps, raw.sum(axis=2), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["sum", "max"])
def test_epsilon_zero_conserves_relevance_without_biases(tmp_path, rng, which):
    net = make_net(tmp_path, SUM_NET if which == "sum" else MAX_NET, seed=3)
    for blobs in net.params.values():
        blobs[1].data[...] = 0
    images = rng.standard_normal((3, *net.blobs["data"].data.shape[1:])).astype(np.float32)
    composite = {"Convolution": lrp.epsilon(0), "InnerProduct": lrp.epsilon(0), "ReLU": "pass"}
    composite.update(Eltwise="norm", Pooling="norm")  # their stabilizer keeps 0 / 0 (an empty window) at 0
    maps = fastsal.attribute(net, images, [0, 1, 2, 3], method="lrp", composite=composite)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-4)  # each map's starting relevance: 1


def test_errors(tmp_path, rng):
    net = make_net(tmp_path, SUM_NET, seed=3)
    with pytest.raises(ValueError, match="unknown composite 'epsilon'"):
        fastsal.Attribution(net, "lrp", composite="epsilon")
    with pytest.raises(ValueError, match="needs low= and high="):
        fastsal.Attribution(net, "lrp", composite="epsilon_gamma_box")
    with pytest.raises(ValueError, match="layer 'relu' \\(ReLU\\) cannot take rule 'zplus'"):
        fastsal.Attribution(net, "lrp", composite={"relu": "zplus"})
    with pytest.raises(ValueError, match="layer 'fc' \\(InnerProduct\\) cannot take rule 'norm'"):
        fastsal.Attribution(net, "lrp", composite={"fc": "norm"})
    with pytest.raises(ValueError, match="neither|nor a Caffe layer type: 'fc7'"):
        fastsal.Attribution(net, "lrp", composite={"fc7": "zplus"})
    with pytest.raises(ValueError, match="alpha - beta must be 1"):
        lrp.alpha_beta(2, 2)
    with pytest.raises(ValueError, match="zbox's low must be a scalar"):
        fastsal.Attribution(net, "lrp", composite={"conv_a": lrp.zbox(np.zeros(5), 1.0)})
    with pytest.raises(ValueError, match="CPU only"):
        fastsal.Attribution(net, "lrp", device=0)
    with pytest.raises(TypeError, match="takes no option 'alpha'"):
        fastsal.Attribution(net, "lrp", alpha=1)


def test_zbox_bounds_per_channel_and_image_shaped(tmp_path, rng):
    net = make_net(tmp_path, MAX_NET, seed=3)
    images = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    low, high = np.array([-3.0, -2.0]), np.array([2.5, 3.5])
    options = dict(method="lrp", composite="epsilon_gamma_box", reduce="none")
    per_channel = fastsal.attribute(net, images, [1], low=low, high=high, **options)
    image_shaped = fastsal.attribute(
        net,
        images,
        [1],
        low=np.broadcast_to(low[:, None, None], (2, 8, 8)),
        high=high[:, None, None] + 0 * images[0],
        **options,
    )
    np.testing.assert_array_equal(per_channel, image_shaped)
    scalar = fastsal.attribute(net, images, [1], low=-3.0, high=3.5, **options)
    assert not np.allclose(per_channel, scalar)  # the bounds reach the rule


def test_cli_epsilon_gamma_box_takes_its_bounds_from_the_preprocessing(model, tmp_path, rng):
    """fastsal run --method lrp --composite epsilon_gamma_box: z-box's bounds are black and white pixels
    after --raw-scale and --mean-value (per channel), so the store holds what attribute() gives with them."""
    from PIL import Image

    from fastsal import cli

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "maps.zarr"
    prototxt, weights = model
    mean = [104.0, 117.0, 123.0]
    words = ["run", str(folder), "--model-def", prototxt, "--pretrained-model", weights, "-o", str(out)]
    words += ["--method", "lrp", "--composite", "epsilon_gamma_box", "--mean-value", "104,117,123", "--quiet"]
    assert cli.main(words) == 0
    import zarr

    store = zarr.open_group(str(out), mode="r")
    paths = [str(p) for p in store["paths"][:]]
    preprocessing = fastsal.Preprocessing((3, 32, 32), mean=np.array(mean, np.float32))
    inputs = np.stack([preprocessing(fastsal.load_image(p)) for p in paths])
    net = fastsal.load(prototxt, weights)
    low, high = -np.array(mean), 255 - np.array(mean)
    expected = fastsal.attribute(
        net, inputs, store["classes"][:], method="lrp", composite="epsilon_gamma_box", low=low, high=high
    )
    np.testing.assert_allclose(store["maps"][:], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
