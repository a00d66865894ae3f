"""Bad input gets a Python exception that names the problem; the interpreter and the net live on."""

from __future__ import annotations

import caffe
import numpy as np
import pytest

import fastsal
from conftest import NETS, _input, conv, fc, layer, make_net, random_images, write


@pytest.fixture
def net(tmp_path):
    return make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])


@pytest.fixture
def images(net, rng):
    return random_images(rng, net, 3)


def test_net_must_be_a_caffe_net(images):
    with pytest.raises(TypeError, match="net must be a caffe.Net, got str"):
        fastsal.compute("deploy.prototxt", images, 0)
    with pytest.raises(TypeError, match="net must be a caffe.Net, got NoneType"):
        fastsal.Saliency(None)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 12), r"images must be \(N, C, H, W\) or one \(C, H, W\) image, got shape \(3, 12\)"),
        ((1, 1, 3, 12, 12), r"got shape \(1, 1, 3, 12, 12\)"),
        (
            (2, 4, 12, 12),
            r"images have shape \(4, 12, 12\) per image, but input blob 'data' takes \(3, 12, 12\)",
        ),
        ((2, 3, 12, 13), r"images have shape \(3, 12, 13\) per image.*never reshapes your net"),
    ],
    ids=["ndim2", "ndim5", "channels", "width"],
)
def test_image_shape_errors(net, shape, message):
    with pytest.raises(ValueError, match=message):
        fastsal.compute(net, np.ones(shape, np.float32), 0)


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((1, 3, 12, 12), np.complex64),
        np.full((1, 3, 12, 12), "x"),
        np.ones((1, 3, 12, 12), bool),
        np.empty((1, 3, 12, 12), object),
    ],
    ids=["complex", "str", "bool", "object"],
)
def test_images_must_be_real_numbers(net, bad):
    with pytest.raises(TypeError, match="images must hold real numbers, got dtype"):
        fastsal.compute(net, bad, 0)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_images_are_refused(net, images, value):
    images[2, 1, 5, 5] = value
    with pytest.raises(ValueError, match=r"images\[2\] contains NaN or Inf"):
        fastsal.compute(net, images, 0)


@pytest.mark.parametrize(
    "classes, error, message",
    [
        (
            7,
            ValueError,
            r"class 7 \(classes\[0, 0\]\) is out of range: score blob 'fc' has 7 classes, 0 to 6",
        ),
        (-1, ValueError, r"class -1 .* is out of range"),
        ([0, 99], ValueError, r"class 99 \(classes\[0, 1\]\) is out of range"),
        (np.array([[0], [1], [70]]), ValueError, r"class 70 \(classes\[2, 0\]\)"),
        (2**40, ValueError, r"is out of range"),
        (1.0, TypeError, "classes must be an int, a sequence of ints or an \\(N, K\\) array, got float"),
        ([1.5, 2.0], TypeError, "classes must be integers, got dtype float64"),
        (True, TypeError, "classes must be integers, got a bool"),
        ("3", TypeError, "got str"),
        ([], ValueError, "classes is empty"),
        (np.zeros((2, 1), int), ValueError, "classes has 2 rows but there are 3 images"),
        (np.zeros((3, 1, 1), int), ValueError, r"got shape \(3, 1, 1\)"),
    ],
    ids=[
        "too-big",
        "negative",
        "in-list",
        "per-image",
        "huge",
        "float",
        "float-list",
        "bool",
        "str",
        "empty",
        "rows",
        "ndim3",
    ],
)
def test_class_errors(net, images, classes, error, message):
    with pytest.raises(error, match=message):
        fastsal.compute(net, images, classes)


def test_top_k_errors(net, images):
    with pytest.raises(ValueError, match="k=8 exceeds the 7 classes of score blob 'fc'"):
        fastsal.compute_top_k(net, images, 8)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        fastsal.compute_top_k(net, images, 0)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_batch_size_errors(net, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        fastsal.Saliency(net, batch_size=batch_size)


def test_unknown_blob_names(net):
    with pytest.raises(
        ValueError, match=r"unknown score blob 'logits'; no blob has a name like it \(net.blobs lists all 7"
    ):
        fastsal.Saliency(net, score="logits")
    with pytest.raises(ValueError, match="unknown input blob 'image'"):
        fastsal.Saliency(net, input="image")
    with pytest.raises(TypeError, match="score must be a blob name"):
        fastsal.Saliency(net, score=3)


def test_blobs_that_cannot_serve(net):
    with pytest.raises(ValueError, match="input blob 'conv1' is not produced by an Input layer"):
        fastsal.Saliency(net, input="conv1")
    with pytest.raises(ValueError, match="score blob 'data' is not computed from input blob 'data'"):
        fastsal.Saliency(net, score="data")


def _with_tail(tail: str) -> str:
    return _input((3, 6, 6)) + conv("conv", "data", 4) + tail


@pytest.mark.parametrize(
    "text, score, message",
    [
        (
            _with_tail(fc("a", "conv", 3) + fc("b", "conv", 2)),
            None,
            "has no Softmax output and has outputs 'a', 'b'; name the blob of class scores with score=",
        ),
        (
            _input((3, 6, 6))
            + layer("other", "Input", [], "extra", "input_param { shape { dim: 2 dim: 3 } }")
            + conv("conv", "data", 4)
            + fc("f", "conv", 3)
            + layer("both", "Concat", ["f", "extra"]),
            "both",
            "also depends on input 'extra'|also depends on layer 'other'",
        ),
        (
            _with_tail(layer("am", "ArgMax", "conv") + fc("s", "am", 2)),
            "s",
            r"layer 'am' \(ArgMax\) has no gradient with respect to its input",
        ),
        (
            _with_tail(
                layer("r", "Reshape", "conv", params="reshape_param { shape { dim: 2 dim: -1 } }")
                + fc("s", "r", 2)
            ),
            "s",
            r"layer 'r' \(Reshape\) fixes the batch dimension; write 'dim: 0'",
        ),
        (
            _with_tail(
                layer("cat", "Concat", ["conv", "conv"], params="concat_param { axis: 0 }")
                + fc("s", "cat", 2)
            ),
            "s",
            r"layer 'cat' \(Concat\) works along axis 0, the batch axis",
        ),
        (
            _with_tail(
                layer("bn", "BatchNorm", "conv", params="batch_norm_param { use_global_stats: false }")
                + fc("s", "bn", 2)
            ),
            "s",
            r"layer 'bn' \(BatchNorm\) sets use_global_stats: false",
        ),
        (
            _with_tail(
                layer("p", "Pooling", "conv", params="pooling_param { pool: STOCHASTIC kernel_size: 2 }")
                + fc("s", "p", 2)
            ),
            "s",
            "uses STOCHASTIC pooling",
        ),
        (
            _with_tail(fc("s", "conv", 2) + fc("t", "data", 2)),
            "t",
            None,
        ),  # fine: a score needs only its ancestors
        (
            _input((3, 6, 6))
            + conv("conv", "data", 2, k=6, pad=0)
            + layer("flat", "Flatten", "conv")
            + layer("red", "Reduction", "flat")
            + fc("s", "conv", 1),
            "red",
            r"layer 'red' \(Reduction\) reduces over axis 0, the batch axis",
        ),
    ],
    ids=[
        "two-outputs",
        "second-input",
        "argmax",
        "fixed-batch-reshape",
        "concat-axis0",
        "batch-stats",
        "stochastic",
        "side-branch",
        "reduction",
    ],
)
def test_nets_fastsal_cannot_differentiate(tmp_path, text, score, message):
    net = make_net(tmp_path, text)
    if message is None:
        assert fastsal.Saliency(net, score=score).num_classes == 2
        return
    with pytest.raises(ValueError, match=message):
        fastsal.Saliency(net, score=score)


def test_embed_layer_is_refused_before_caffe_aborts(tmp_path):
    """force_backward makes Embed hit CHECK(!propagate_down[0]), which would abort the interpreter."""
    text = (
        _input((1, 4, 4))
        + layer("emb", "Embed", "data", params="embed_param { num_output: 3 input_dim: 10 }")
        + fc("s", "emb", 2)
    )
    net = make_net(tmp_path, text)
    with pytest.raises(ValueError, match=r"layer 'emb' \(Embed\) has no gradient with respect to its input"):
        fastsal.Saliency(net)


def test_errors_lose_nothing(net, images):
    expected = fastsal.compute(net, images, [1, 2])
    for bad in (lambda: fastsal.compute(net, images, 70), lambda: fastsal.compute(net, images[:, :2], 0)):
        with pytest.raises(ValueError):
            bad()
    np.testing.assert_array_equal(fastsal.compute(net, images, [1, 2]), expected)


# ---- fastsal.load: bad files raise instead of aborting the interpreter ----

GOOD = (
    _input((3, 6, 6), batch=1)
    + conv("conv", "data", 4)
    + fc("fc", "conv", 3)
    + layer("prob", "Softmax", "fc")
)


@pytest.fixture
def weights(tmp_path):
    net = make_net(tmp_path, GOOD, seed=9)
    path = tmp_path / "good.caffemodel"
    net.save(str(path))
    return path


def test_load_good_files(tmp_path, weights):
    net = fastsal.load(write(tmp_path, GOOD, "good.prototxt"), weights)
    reference = caffe.Net(write(tmp_path, GOOD, "good.prototxt"), caffe.TEST, weights=str(weights))
    np.testing.assert_array_equal(net.params["fc"][0].data, reference.params["fc"][0].data)
    assert fastsal.load(tmp_path / "good.prototxt").blobs["data"].data.shape == (1, 3, 6, 6)


def test_load_missing_files(tmp_path, weights):
    with pytest.raises(FileNotFoundError, match="no such file: .*absent.prototxt"):
        fastsal.load(tmp_path / "absent.prototxt", weights)
    with pytest.raises(FileNotFoundError, match="no such file: .*absent.caffemodel"):
        fastsal.load(write(tmp_path, GOOD), tmp_path / "absent.caffemodel")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "layer { name: 'x' type: 'Input' top: 'data' input_param { shape { dim: 1 } }",
            "Error parsing text-format",
        ),
        ("layer { name: 'x' colour: 3 }", "Error parsing text-format.*colour"),
        (_input((3, 6, 6)) + fc("fc", "missing", 3), "Unknown bottom blob 'missing'"),
        (_input((3, 6, 6)) + layer("w", "NoSuchLayer", "data"), "Unknown layer type: NoSuchLayer"),
        (
            _input((3, 6, 6))
            + layer("c", "Convolution", "data", params="convolution_param { num_output: 2 }"),
            "kernel_size|Check failed",
        ),
    ],
    ids=["unterminated", "unknown-field", "unknown-bottom", "unknown-type", "no-kernel"],
)
def test_load_broken_prototxt(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        fastsal.load(write(tmp_path, text, "broken.prototxt"))


def test_load_weights_that_do_not_fit(tmp_path, weights):
    other = GOOD.replace("num_output: 3", "num_output: 5")
    with pytest.raises(ValueError, match="Cannot copy param 0 weights from layer 'fc'; shape mismatch"):
        fastsal.load(write(tmp_path, other, "other.prototxt"), weights)


def test_load_truncated_weights(tmp_path, weights):
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="Failed to parse NetParameter file"):
        fastsal.load(write(tmp_path, GOOD), truncated)
