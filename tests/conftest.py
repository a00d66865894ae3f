"""Shared test fixtures: small Caffe nets with seeded weights, and the oracle every engine result is
checked against, the seed recipe from the caffe-users thread (force_backward, one-hot diff, backward)."""

from __future__ import annotations

import caffe
import numpy as np
import pytest

import fastsal

fastsal.set_caffe_log_level(1)

RTOL = 1e-4  # engine vs seed recipe, relative to the largest reference value


def _input(shape, batch=2):
    dims = " ".join(f"dim: {d}" for d in (batch, *shape))
    return f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'


def conv(name, bottom, n, k=3, pad=1, stride=1, top=None, group=1):
    return (
        f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
        f"convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} stride: {stride} group: {group} }} }}\n"
    )


def conv_matrix(weights, in_shape, pad, stride):
    """The convolution as a dense (out, in) matrix."""
    o_count, c_count, k, _ = weights.shape
    _, h, w = in_shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    m = np.zeros((o_count, oh, ow, c_count, h, w))
    for o in range(o_count):
        for y in range(oh):
            for x in range(ow):
                for ky in range(k):
                    for kx in range(k):
                        yy, xx = y * stride - pad + ky, x * stride - pad + kx
                        if 0 <= yy < h and 0 <= xx < w:
                            m[o, y, x, :, yy, xx] = weights[o, :, ky, kx]
    return m.reshape(o_count * oh * ow, c_count * h * w)


def layer(name, type_, bottoms, tops=None, params=""):
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [name] if tops is None else ([tops] if isinstance(tops, str) else tops)
    text = " ".join(f'bottom: "{b}"' for b in bottoms) + " " + " ".join(f'top: "{t}"' for t in tops)
    return f'layer {{ name: "{name}" type: "{type_}" {text} {params} }}\n'


def fc(name, bottom, n):
    return layer(name, "InnerProduct", bottom, params=f"inner_product_param {{ num_output: {n} }}")


def resnet_block(shape, channels: int, pooling: str, batch: int = 2) -> str:
    """A ResNet block: convolution, BatchNorm and Scale in place, ReLU; a two-convolution branch summed
    with that shortcut (Caffe inserts a Split), ReLU; pooling, a fully connected score, Softmax."""
    scale = "scale_param { bias_term: true }"
    return (
        _input(shape, batch)
        + conv("conv1", "data", channels)
        + layer("bn1", "BatchNorm", "conv1", "conv1")
        + layer("scale1", "Scale", "conv1", "conv1", scale)
        + layer("relu1", "ReLU", "conv1", "conv1")
        + conv("branch_a", "conv1", channels)
        + layer("bn_a", "BatchNorm", "branch_a", "branch_a")
        + layer("scale_a", "Scale", "branch_a", "branch_a", scale)
        + layer("relu_a", "ReLU", "branch_a", "branch_a")
        + conv("branch_b", "branch_a", channels)
        + layer("sum", "Eltwise", ["conv1", "branch_b"])
        + layer("relu_sum", "ReLU", "sum", "sum")
        + layer("pool", "Pooling", "sum", params=pooling)
        + fc("fc", "pool", 5)
        + layer("prob", "Softmax", "fc")
    )


# Small nets covering the layer types of real image nets. Each maps name -> (prototxt, score blob).
NETS = {
    "conv_maxpool_fc_softmax": (
        _input((3, 12, 12))
        + conv("conv1", "data", 6)
        + layer("relu1", "ReLU", "conv1", "conv1")
        + layer("pool1", "Pooling", "conv1", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        + conv("conv2", "pool1", 8)
        + layer("relu2", "ReLU", "conv2", "conv2")
        + layer("pool2", "Pooling", "conv2", params="pooling_param { pool: AVE kernel_size: 2 stride: 2 }")
        + fc("fc", "pool2", 7)
        + layer("prob", "Softmax", "fc"),
        "fc",
    ),
    "resnet_block_bn_scale_eltwise": (
        resnet_block((3, 10, 10), 8, "pooling_param { pool: AVE global_pooling: true }"),
        "fc",
    ),
    "inception_concat_lrn_no_softmax": (
        _input((3, 9, 9))
        + conv("c1", "data", 4, k=1, pad=0)
        + conv("c3", "data", 4, k=3, pad=1)
        + layer("lrn", "LRN", "c3", params="lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 }")
        + layer("cat", "Concat", ["c1", "lrn"])
        + layer("prelu", "PReLU", "cat", "cat")
        + layer("pool", "Pooling", "cat", params="pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
        + layer("drop", "Dropout", "pool", "pool", "dropout_param { dropout_ratio: 0.5 }")
        + fc("score", "pool", 6),
        "score",
    ),
    # The convolution shapes fastsal's oneDNN backward must map exactly: stride with Caffe's floored output
    # (asymmetric padding), groups, dilation, a stride-2 1x1 whose last window ends short of the edge (no
    # right padding); leaky ReLU.
    "conv_strides_groups_dilation_leaky": (
        _input((4, 11, 11))
        + conv("strided", "data", 6, k=3, pad=1, stride=2)
        + layer("leaky", "ReLU", "strided", "strided", "relu_param { negative_slope: 0.1 }")
        + conv("grouped", "strided", 6, k=3, pad=1, group=3)
        + layer("relu", "ReLU", "grouped", "grouped")
        + layer(
            "dilated",
            "Convolution",
            "grouped",
            params="convolution_param { num_output: 4 kernel_size: 3 pad: 2 dilation: 2 }",
        )
        + conv("shrink", "dilated", 4, k=1, pad=0, stride=2)
        + fc("fc", "shrink", 5),
        "fc",
    ),
    "eltwise_max_prod_sigmoid_tanh": (
        _input((2, 8, 8))
        + conv("a", "data", 4)
        + conv("b", "data", 4)
        + layer("emax", "Eltwise", ["a", "b"], params="eltwise_param { operation: MAX }")
        + layer("sig", "Sigmoid", "a")
        + layer("tanh", "TanH", "b")
        + layer("eprod", "Eltwise", ["sig", "tanh"], params="eltwise_param { operation: PROD }")
        + layer("cat", "Concat", ["emax", "eprod"])
        + layer("flat", "Flatten", "cat")
        + fc("fc", "flat", 4)
        + layer("prob", "Softmax", "fc"),
        "fc",
    ),
}


def randomize_weights(net: caffe.Net, seed: int) -> None:
    """Seeded weights, never zeros; BatchNorm gets plausible statistics (positive variances)."""
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        layer_type = net.layers[list(net._layer_names).index(name)].type
        if layer_type == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 0.5, blobs[0].data.shape)
            blobs[1].data[...] = rng.uniform(0.5, 2.0, blobs[1].data.shape)
            blobs[2].data[...] = 1.0
        else:
            for blob in blobs:
                fan_in = max(1, int(np.prod(blob.data.shape[1:])))
                blob.data[...] = rng.normal(0, 1.5 / np.sqrt(fan_in), blob.data.shape)


def write(tmp_path, text: str, name: str = "net.prototxt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def make_net(tmp_path, text: str, seed: int = 0) -> caffe.Net:
    net = caffe.Net(write(tmp_path, text), caffe.TEST)
    randomize_weights(net, seed)
    return net


def producer_layer(net: caffe.Net, blob: str) -> str:
    return [name for name, tops in net.top_names.items() if blob in tops][-1]


def force_backward_copy(net: caffe.Net, prototxt: str) -> caffe.Net:
    """The pycaffe way to get gradients from a deploy net: the same prototxt with force_backward on,
    sharing the net's weights. Every pycaffe reference in the tests starts here."""
    with open(prototxt) as f:
        text = "force_backward: true\n" + f.read()
    reference_path = prototxt + ".force_backward.prototxt"
    with open(reference_path, "w") as f:
        f.write(text)
    reference = caffe.Net(reference_path, caffe.TEST)
    reference.share_with(net)
    return reference


def seed_recipe(net: caffe.Net, prototxt: str, images, classes, score: str, input_blob: str = "data"):
    """classes: (N, K). The caffe-users recipe, one image and one class at a time, through pycaffe: a force_backward copy
    of the net sharing its weights, forward to the score, a one-hot in the score's diff, backward,
    then NumPy's abs and max over channels. Returns (maps (N, K, H, W), gradients (N, K, C, H, W))."""
    reference = force_backward_copy(net, prototxt)
    images = np.asarray(images, np.float32)
    classes = np.asarray(classes)
    assert classes.shape[0] == len(images), "the oracle takes (N, K) classes"
    reference.blobs[input_blob].reshape(1, *images.shape[1:])
    reference.reshape()
    last = producer_layer(reference, score)
    grads = np.empty((len(images), classes.shape[1], *images.shape[1:]), np.float32)
    for n, image in enumerate(images):
        reference.blobs[input_blob].data[0] = image
        reference.forward(end=last)
        for k, c in enumerate(classes[n]):
            reference.blobs[score].diff[...] = 0
            reference.blobs[score].diff.reshape(1, -1)[0, c] = 1
            grads[n, k] = reference.backward(start=last, diffs=[input_blob])[input_blob][0]
    return np.abs(grads).max(axis=2), grads


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (float maps have no ties to speak of)."""
    ranks = [np.argsort(np.argsort(x.ravel())).astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def assert_close_to_reference(actual, reference, rtol=RTOL):
    """Every element within rtol of the reference, relative to the reference's largest magnitude."""
    scale = float(np.abs(reference).max())
    assert scale > 0, "reference is all zeros: the check would be vacuous"
    np.testing.assert_allclose(actual, reference, rtol=rtol, atol=rtol * scale)


@pytest.fixture(params=sorted(NETS), ids=sorted(NETS))
def small_net(request, tmp_path):
    text, score = NETS[request.param]
    path = write(tmp_path, text)
    net = caffe.Net(path, caffe.TEST)
    randomize_weights(net, seed=len(request.param))
    return net, path, score


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_images(rng, net: caffe.Net, n: int, input_blob: str = "data") -> np.ndarray:
    return rng.standard_normal((n, *net.blobs[input_blob].data.shape[1:])).astype(np.float32)


# The jobs tests' model: a small classifier of 32x32 photos, saved as a prototxt and a .caffemodel.
JOB_NET = (
    _input((3, 32, 32), batch=1)
    + conv("conv1", "data", 8)
    + layer("relu1", "ReLU", "conv1", "conv1")
    + layer("pool1", "Pooling", "conv1", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    + conv("conv2", "pool1", 8)
    + layer("relu2", "ReLU", "conv2", "conv2")
    + fc("fc", "conv2", 5)
    + layer("prob", "Softmax", "fc")
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    net = make_net(folder, JOB_NET, seed=21)
    net.save(str(folder / "net.caffemodel"))
    return str(folder / "net.prototxt"), str(folder / "net.caffemodel")
