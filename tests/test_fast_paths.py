"""fastsal's speed paths against Caffe's own arithmetic: the exact layers' forward bit for bit, the class
head's one backward for all classes against the seed recipe, and the inexact mode's maps in rank."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import caffe
import numpy as np
import pytest

import fastsal
from conftest import (
    NETS,
    _input,
    assert_close_to_reference,
    conv,
    fc,
    layer,
    make_net,
    random_images,
    seed_recipe,
    spearman,
)
from fastsal import examples

POOL = "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"

# Every branch of the exact layers: BatchNorm not in place, Scale without a bias, a Split into three,
# an Eltwise sum of three, max pooling with padding and overlapping windows.
WIDE_SPLIT = (
    _input((3, 9, 9))
    + conv("conv1", "data", 6)
    + layer("bn1", "BatchNorm", "conv1", "bn1")
    + layer("scale1", "Scale", "bn1", "bn1")
    + layer("relu1", "ReLU", "bn1", "bn1")
    + conv("a", "bn1", 6)
    + conv("b", "bn1", 6)
    + layer("sum", "Eltwise", ["a", "b", "bn1"])
    + layer("pool", "Pooling", "sum", params="pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }")
    + fc("fc", "pool", 5)
    + layer("prob", "Softmax", "fc")
)

# A head of fully connected layers: in-place ReLU and Dropout, a leaky ReLU written to a new blob.
FC_HEAD = (
    _input((3, 8, 8))
    + conv("conv1", "data", 4)
    + layer("relu1", "ReLU", "conv1", "conv1")
    + layer("pool1", "Pooling", "conv1", params=POOL)
    + fc("fc1", "pool1", 24)
    + layer("relu_fc1", "ReLU", "fc1", "fc1")
    + layer("drop1", "Dropout", "fc1", "fc1", "dropout_param { dropout_ratio: 0.5 }")
    + fc("fc2", "fc1", 20)
    + layer("leaky", "ReLU", "fc2", "fc2_out", "relu_param { negative_slope: 0.2 }")
    + fc("score", "fc2_out", 50)
    + layer("prob", "Softmax", "score")
)

# Two fully connected branches summed: the head stops above the Eltwise, whose inputs both need the diff.
FC_BRANCHES = (
    _input((3, 8, 8))
    + conv("conv1", "data", 4)
    + layer("relu1", "ReLU", "conv1", "conv1")
    + fc("fc1", "conv1", 16)
    + layer("relu_fc1", "ReLU", "fc1", "fc1")
    + fc("fc_a", "fc1", 12)
    + fc("fc_b", "fc1", 12)
    + layer("sum", "Eltwise", ["fc_a", "fc_b"])
    + layer("relu_sum", "ReLU", "sum", "sum")
    + fc("score", "sum", 9)
    + layer("prob", "Softmax", "score")
)

# No kink anywhere (sigmoid, tanh, average pooling): the inexact forward then differs only in rounding.
SMOOTH = (
    _input((3, 10, 10))
    + conv("conv1", "data", 8)
    + layer("sig", "Sigmoid", "conv1", "conv1")
    + layer("pool", "Pooling", "conv1", params="pooling_param { pool: AVE kernel_size: 2 stride: 2 }")
    + conv("conv2", "pool", 8, stride=2)
    + layer("tanh", "TanH", "conv2", "conv2")
    + fc("fc1", "conv2", 32)
    + layer("tanh_fc", "TanH", "fc1", "fc1")
    + fc("score", "fc1", 6)
)


@pytest.mark.parametrize(
    "text",
    [*(NETS[name][0] for name in sorted(NETS)), WIDE_SPLIT, FC_HEAD],
    ids=[*sorted(NETS), "wide_split", "fc_head"],
)
def test_exact_forward_is_caffes_bit_for_bit(tmp_path, rng, text):
    """The exact mode's promise: fastsal's layers compute Caffe's forward values, rounding included,
    so no ReLU kink or max-pooling tie can go another way than in the seed recipe."""
    net = make_net(tmp_path, text, seed=5)
    images = random_images(rng, net, 5)
    fast = fastsal.Attribution(net, batch_size=3).scores(images)
    stock = fastsal.Attribution(net, batch_size=3, fast_layers=False).scores(images)
    np.testing.assert_array_equal(fast, stock)


# Sizes at which gemm.hpp splits Caffe's products over the threads (the small nets stay below them):
# grouped and 1x1 convolutions, biases, and a fully connected layer.
WIDE = (
    _input((16, 40, 40))
    + conv("conv1", "data", 64, group=2)
    + layer("relu1", "ReLU", "conv1", "conv1")
    + conv("conv2", "conv1", 128, k=1, pad=0)
    + layer("relu2", "ReLU", "conv2", "conv2")
    + fc("fc1", "conv2", 512)
    + fc("score", "fc1", 10)
)


def _vgg16() -> caffe.Net:
    caffe.set_random_seed(0)  # Caffe's seeded fillers: no trained weights are downloaded
    return caffe.Net(str(Path(__file__).resolve().parents[1] / "bench" / "vgg16_deploy.prototxt"), caffe.TEST)


@pytest.mark.parametrize("model", ["wide", "open_nsfw", "vgg16"])
def test_exact_forward_is_caffes_bit_for_bit_at_full_size(tmp_path, rng, model):
    """Caffe's products run split over fastsal's threads at these sizes: still Caffe's values."""
    if model == "wide":
        net = make_net(tmp_path, WIDE, seed=5)
        images = random_images(rng, net, 3)
    else:
        net = _vgg16() if model == "vgg16" else fastsal.load(*examples.open_nsfw_files())
        images = examples.open_nsfw_batch()[0][:2]
    fast = fastsal.Attribution(net, batch_size=2).scores(images)
    stock = fastsal.Attribution(net, batch_size=2, fast_layers=False).scores(images)
    np.testing.assert_array_equal(fast, stock)


@pytest.mark.parametrize(
    "size, kernel, stride, pad",
    [
        ((7, 7), 3, 2, 0),
        ((8, 6), 3, 2, 1),
        ((5, 9), 2, 2, 0),
        ((6, 6), 5, 3, 2),
        ((4, 4), 1, 1, 0),
        ((3, 2), 3, 1, 1),
    ],
)
def test_max_pooling_routes_every_gradient_as_caffe_does(tmp_path, rng, size, kernel, stride, pad):
    """fastsal's max pooling (a row of windows at a time) against Caffe's own layer in the seed recipe,
    bit for bit, on small integers: many ties, where only the first maximum of a window may win."""
    pooling = f"pooling_param {{ pool: MAX kernel_size: {kernel} stride: {stride} pad: {pad} }}"
    text = _input((3, *size)) + layer("pool", "Pooling", "data", params=pooling) + fc("fc", "pool", 4)
    net = make_net(tmp_path, text, seed=2)
    images = rng.integers(-2, 3, (2, 3, *size)).astype(np.float32)
    classes = [[0, 1, 2, 3]] * 2
    reference, _ = seed_recipe(net, str(tmp_path / "net.prototxt"), images, classes, "fc")
    np.testing.assert_array_equal(fastsal.compute(net, images, classes), reference)


@pytest.mark.parametrize(
    ("text", "score", "head"),
    [(FC_HEAD, "score", "fc1"), (FC_BRANCHES, "score", "relu_sum")],
    ids=["fc_head", "fc_branches"],
)
@pytest.mark.parametrize(
    ("n", "k", "budget"),
    [(3, 5, None), (1, 40, None), (2, 7, 1)],
    ids=["streamed", "gemm_rows", "one_class_per_chunk"],
)
def test_class_head_matches_seed_recipe(tmp_path, rng, text, score, head, n, k, budget):
    """One backward through the fully connected head for K classes (up to 32 rows streamed, more by
    GEMM, in chunks bounded by the memory budget), then one per class below it."""
    net = make_net(tmp_path, text, seed=2)
    images = random_images(rng, net, n)
    classes = np.stack([rng.permutation(net.blobs[score].data.shape[1])[:k] for _ in range(n)])
    options = {"memory_budget": budget, "batch_size": 2} if budget else {}
    saliency = fastsal.Saliency(net, **options)
    assert saliency._engine.head_layer == head
    grads = saliency.compute(images, classes, gradients=True)
    _, reference = seed_recipe(net, str(tmp_path / "net.prototxt"), images, classes, score)
    assert_close_to_reference(grads, reference)


def test_no_head_without_a_fully_connected_layer_or_with_fast_layers_off(tmp_path):
    net = make_net(tmp_path, NETS["eltwise_max_prod_sigmoid_tanh"][0])
    assert fastsal.Saliency(net)._engine.head_layer == "fc"
    assert fastsal.Saliency(net, fast_layers=False)._engine.head_layer == ""
    conv_score = (
        _input((3, 6, 6)) + conv("c1", "data", 4) + layer("relu", "ReLU", "c1", "c1") + conv("c2", "c1", 3)
    )
    assert fastsal.Saliency(make_net(tmp_path, conv_score), score="c2")._engine.head_layer == ""


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "gradcam", "integrated_gradients"])
def test_class_head_keeps_every_method(tmp_path, rng, method):
    """The head applies the ReLU rules and stops where Grad-CAM's blob is, as the per-class backward does."""
    net = make_net(tmp_path, FC_HEAD, seed=4)
    images = random_images(rng, net, 2)
    options = {"layer": "conv1"} if method == "gradcam" else {}
    if method == "integrated_gradients":
        options["n_steps"] = 4
    fast = fastsal.Attribution(net, method, reduce="none", **options) if method != "gradcam" else None
    if fast is None:
        fast = fastsal.Attribution(net, method, **options)
        stock = fastsal.Attribution(net, method, fast_layers=False, **options)
    else:
        stock = fastsal.Attribution(net, method, reduce="none", fast_layers=False, **options)
    classes = [3, 17, 40, 8]
    assert_close_to_reference(fast.compute(images, classes), stock.compute(images, classes))


def test_inexact_mode_on_a_smooth_net_differs_only_in_rounding(tmp_path, rng):
    """With no kink to reroute the gradient, the oneDNN forward and the streamed fully connected forward
    (bias included) must give the seed recipe's maps to float rounding with an fp32 backward, and within
    1e-2 of the maximum with the default one (bf16 on a CPU with AMX)."""
    net = make_net(tmp_path, SMOOTH, seed=6)
    images = random_images(rng, net, 4)
    classes = np.tile([0, 3, 5], (4, 1))
    maps = fastsal.Saliency(net, exact=False, _bf16_backward=False).compute(images, classes)
    reference, _ = seed_recipe(net, str(tmp_path / "net.prototxt"), images, classes, "score")
    assert_close_to_reference(maps, reference)
    default = fastsal.compute(net, images, classes, exact=False)
    if fastsal.build_info()["inexact_backward"] == "fp32":
        assert_close_to_reference(default, reference)
    else:
        assert_close_to_reference(default, reference, rtol=1e-2)
    exact_scores = fastsal.Attribution(net).scores(images)
    inexact_scores = fastsal.Attribution(net, exact=False).scores(images)
    np.testing.assert_allclose(inexact_scores, exact_scores, rtol=1e-5, atol=1e-5)


def test_inexact_needs_fast_layers(tmp_path):
    net = make_net(tmp_path, SMOOTH)
    with pytest.raises(ValueError, match="exact=False needs fast_layers=True"):
        fastsal.Saliency(net, exact=False, fast_layers=False)


def _bottleneck(i: str, bottom: str, width: int, out: int) -> str:
    """open_nsfw's downsampling block: a stride-2 1x1 projection and branch (on an even size), a 3x3, a
    1x1, BatchNorm and Scale in place after each, summed, ReLU."""
    scale = "scale_param { bias_term: true }"

    def folded(name):
        return layer(f"bn_{name}", "BatchNorm", name, name) + layer(
            f"scale_{name}", "Scale", name, name, scale
        )

    return (
        conv(f"proj{i}", bottom, out, k=1, pad=0, stride=2)
        + folded(f"proj{i}")
        + conv(f"a{i}", bottom, width, k=1, pad=0, stride=2)
        + folded(f"a{i}")
        + layer(f"relu_a{i}", "ReLU", f"a{i}", f"a{i}")
        + conv(f"b{i}", f"a{i}", width)
        + folded(f"b{i}")
        + layer(f"relu_b{i}", "ReLU", f"b{i}", f"b{i}")
        + conv(f"c{i}", f"b{i}", out, k=1, pad=0)
        + folded(f"c{i}")
        + layer(f"sum{i}", "Eltwise", [f"proj{i}", f"c{i}"])
        + layer(f"relu_sum{i}", "ReLU", f"sum{i}", f"sum{i}")
    )


# Two ResNet stages. Between oneDNN convolutions the blobs can stay in oneDNN's layout: conv1's output
# (read by stage 1's convolutions alone, through a Split), stage 1 inside and its sum (read by stage 2's
# convolutions), stage 2's branch. Not the input, nor stage 2's sum, which average pooling reads.
RESNET_STAGES = (
    _input((3, 16, 16))
    + conv("conv1", "data", 16)
    + layer("bn_conv1", "BatchNorm", "conv1", "conv1")
    + layer("scale_conv1", "Scale", "conv1", "conv1", "scale_param { bias_term: true }")
    + layer("relu_conv1", "ReLU", "conv1", "conv1")
    + _bottleneck("1", "conv1", 16, 32)
    + _bottleneck("2", "sum1", 32, 64)
    + layer("pool", "Pooling", "sum2", params="pooling_param { pool: AVE global_pooling: true }")
    + fc("fc", "pool", 5)
    + layer("prob", "Softmax", "fc")
)


@pytest.mark.skipif(not fastsal.build_info()["onednn_isa"], reason="built without oneDNN")
@pytest.mark.parametrize(
    "method, options",
    [
        ("saliency", {}),
        ("guided_backprop", {}),
        ("gradcam", {"layer": "sum1"}),
        ("smoothgrad", {"samples": 3, "seed": 0}),
    ],
)
def test_blocked_layouts_change_no_value(tmp_path, rng, method, options):
    """The inexact mode keeps the blobs that only oneDNN convolutions and element-wise layers touch in
    oneDNN's layout: the same maps bit for bit as with Caffe's layout and a reorder around every
    convolution, for every method; Grad-CAM's blob, which the engine reads, stays NCHW. A stride-2 1x1 layer
    whose last window ends short of the edge is a oneDNN convolution too (it once fell back to Caffe)."""
    net = make_net(tmp_path, RESNET_STAGES, seed=11)
    images = random_images(rng, net, 3)
    classes = [[0, 4], [2, 1], [3, 3]]
    engine = fastsal.Saliency(net, exact=False)._engine
    kept = {"conv1", "proj1", "a1", "b1", "c1", "sum1", "a2", "b2"}  # and the Splits' tops of conv1, sum1
    assert set(engine.blocked_blobs) == {b for b in net.blobs if b.split("_")[0] in kept}
    assert fastsal.Saliency(net, exact=False, _blocked_layouts=False)._engine.blocked_blobs == []
    assert fastsal.Saliency(net)._engine.blocked_blobs == []  # the exact forward is Caffe's, on NCHW
    blocked, plain = (
        fastsal.Attribution(net, method, exact=False, batch_size=2, _blocked_layouts=b, **options)
        for b in (True, False)
    )
    maps = blocked.compute(images, classes)
    assert np.abs(maps).max() > 0
    np.testing.assert_array_equal(maps, plain.compute(images, classes))


@pytest.mark.skipif(not fastsal.build_info()["onednn_isa"], reason="built without oneDNN")
def test_fused_relus_change_no_value(tmp_path, rng):
    """A forward-only inexact engine applies each plain ReLU in place on a oneDNN convolution (after the
    BatchNorm and Scale that convolution folds) inside the convolution's forward: the same scores and
    layer values as the ReLU layers' own forward. Engines with a backward keep the layers (their mask)."""
    from fastsal._forward import Forward

    net = make_net(tmp_path, RESNET_STAGES, seed=11)
    images = random_images(rng, net, 3)
    fused = Forward(net, exact=False, layer="b2")
    assert sorted(fused._engine._engine.fused_relus) == [
        "relu_a1",
        "relu_a2",
        "relu_b1",
        "relu_b2",
        "relu_conv1",
    ]
    plain = fastsal.Saliency(net, exact=False, _gradient_blob="b2")
    assert plain._engine.fused_relus == []
    values, scores = fused.activations(images)
    np.testing.assert_array_equal(scores, plain._scores(images))
    assert (values == 0).any() and (values > 0).any()  # relu_b2 cut something
    expected = np.empty_like(values)
    plain._engine.scores(images, np.empty_like(scores), 0, activations=expected)
    np.testing.assert_array_equal(values, expected)


def _agreement(inexact: np.ndarray, exact: np.ndarray) -> tuple[list[float], list[float]]:
    """Per (image, class) map: the Spearman rank correlation, and the fraction of pixels within 1e-2 of
    the exact map's max."""
    pairs = [(inexact[n, k], exact[n, k]) for n in range(exact.shape[0]) for k in range(exact.shape[1])]
    correlations = [spearman(a, b) for a, b in pairs]
    within = [float((np.abs(a - b) <= 1e-2 * np.abs(b).max()).mean()) for a, b in pairs]
    return correlations, within


def test_inexact_mode_agrees_in_rank_on_open_nsfw():
    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    images = examples.open_nsfw_batch()[0]
    exact = fastsal.compute(net, images, [0, 1])
    inexact = fastsal.compute(net, images, [0, 1], exact=False)
    correlations, within = _agreement(inexact, exact)
    assert min(correlations) >= 0.99 and min(within) >= 0.99, (correlations, within)


def test_inexact_mode_agrees_in_rank_on_vgg16():
    """VGG-16 with Caffe's seeded fillers (no trained weights are downloaded), 4 photos x 5 classes.
    Measured: Spearman >= 0.9997 on every map; 19 of the 20 maps have 99% of their pixels within 1e-2
    of the max, the last 98.7%. So: every map 98%, the mean 99%."""
    net = _vgg16()
    images = examples.open_nsfw_batch()[0]
    classes = [0, 1, 250, 500, 999]
    exact = fastsal.compute(net, images, classes)
    inexact = fastsal.compute(net, images, classes, exact=False)
    correlations, within = _agreement(inexact, exact)
    assert min(correlations) >= 0.99, correlations
    assert min(within) >= 0.98 and np.mean(within) >= 0.99, within


def test_split_products_leave_openblas_as_found(tmp_path, rng):
    """gemm.hpp runs OpenBLAS single-threaded on fastsal's threads: the caller's thread count comes back,
    also when two calls overlap, and overlapping calls give the maps of a call alone."""
    try:
        openblas = ctypes.CDLL("libopenblas.so.0")  # the copy Caffe loaded, not a second one
    except OSError:
        pytest.skip("Caffe is not linked against OpenBLAS")
    before = openblas.openblas_get_num_threads()
    net = make_net(tmp_path, WIDE, seed=5)
    images = random_images(rng, net, 4)
    alone = fastsal.Saliency(net, batch_size=2).compute(images, [0, 3])
    with ThreadPoolExecutor(2) as pool:
        overlapping = list(
            pool.map(lambda _: fastsal.Saliency(net, batch_size=2).compute(images, [0, 3]), range(2))
        )
    assert openblas.openblas_get_num_threads() == before
    for maps in overlapping:
        np.testing.assert_array_equal(maps, alone)


def test_import_leaves_the_openmp_policy_alone():
    """Every CPU thread fastsal uses is an OpenMP thread (its layers, oneDNN, Caffe's products through
    gemm.hpp), so the import order and OMP_WAIT_POLICY are the user's: fastsal sets nothing."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, fastsal; print(os.environ.get('OMP_WAIT_POLICY'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "None"
