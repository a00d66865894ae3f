"""The public API's edges: nets reshaped or re-shared between calls, default Grad-CAM layers on branched
nets, options and names that are wrong, and the messages that say so. Each test failed before its fix
(some parametrisations pin methods that already behaved); aborts are tried in a child interpreter."""

from __future__ import annotations

import re
from pathlib import Path

import caffe
import numpy as np
import pytest
from test_hardening import run_isolated

import fastsal
from conftest import NETS, _input, conv, fc, layer, make_net, random_images
from fastsal._attribution import METHODS

GAP = "pooling_param { pool: AVE global_pooling: true }"
# Weights that fit any image size; the 3x3 convolution is unpadded, so a 1x1 image is too small for it.
UNPADDED = _input((3, 8, 8)) + conv("conv", "data", 4, pad=0) + layer("gap", "Pooling", "conv", params=GAP)
UNPADDED += fc("fc", "gap", 3)


@pytest.fixture
def net(tmp_path):
    return make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])


@pytest.fixture
def images(net, rng):
    return random_images(rng, net, 2)


# ---- 1. an input blob reshaped without net.reshape() ----


def test_input_blob_reshaped_too_small_is_refused_not_fatal():
    """Caffe CHECK-aborted building the internal net at 1x1 (blob.cpp:32, shape[i] >= 0)."""
    result = run_isolated(
        f"""
        import tempfile, pathlib, numpy as np, fastsal
        from conftest import make_net
        net = make_net(pathlib.Path(tempfile.mkdtemp()), {UNPADDED!r})
        net.blobs["data"].reshape(1, 3, 1, 1)  # the blob only: Caffe checks nothing until net.reshape()
        for call in (lambda: fastsal.Saliency(net), lambda: fastsal.compute(net, np.ones((1, 3, 1, 1)), 0),
                     lambda: fastsal.Attribution(net, "gradcam", layer="conv")):
            try:
                call()
            except ValueError as error:
                print("refused:", error)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    refusals = re.findall(
        r"refused: images of 1x1 are too small for layer 'conv' \(Convolution\)", result.stdout
    )
    assert len(refusals) == 3, result.stdout


# ---- 2. Attribution.scores() follows the net as compute() does ----


def pycaffe_scores(net: caffe.Net, images: np.ndarray, score: str = "fc") -> np.ndarray:
    """The oracle: pycaffe's forward on the user's net itself."""
    net.blobs["data"].reshape(*images.shape)
    net.reshape()
    net.blobs["data"].data[...] = images
    net.forward()
    return net.blobs[score].data.copy()


def test_scores_follow_share_with(tmp_path, rng):
    net, other = make_net(tmp_path, UNPADDED, seed=1), make_net(tmp_path, UNPADDED, seed=2)
    images = random_images(rng, net, 3)
    attribution = fastsal.Attribution(net, "smoothgrad", samples=2, seed=0)
    before = attribution.scores(images)
    net.share_with(other)
    expected = pycaffe_scores(other, images)
    assert np.abs(before - expected).max() > 1e-3  # the old weights' scores differ
    np.testing.assert_allclose(attribution.scores(images), expected, rtol=1e-5, atol=1e-6)


def test_scores_follow_net_reshape(tmp_path, rng):
    net = make_net(tmp_path, UNPADDED)
    attribution = fastsal.Attribution(net, "integrated_gradients", n_steps=2)
    attribution.scores(random_images(rng, net, 2))
    net.blobs["data"].reshape(2, 3, 11, 9)
    net.reshape()
    images = random_images(rng, net, 2)
    np.testing.assert_allclose(attribution.scores(images), pycaffe_scores(net, images), rtol=1e-5, atol=1e-6)


def test_image_baselines_after_net_reshape_are_refused_by_name(tmp_path, rng):
    """numpy's broadcast error came instead ("could not broadcast input array from shape ...")."""
    net = make_net(tmp_path, UNPADDED)
    attribution = fastsal.Attribution(net, "integrated_gradients", n_steps=2, baselines=np.zeros((3, 8, 8)))
    net.blobs["data"].reshape(1, 3, 10, 10)
    net.reshape()
    with pytest.raises(
        ValueError, match=r"baselines are \(3, 8, 8\) images, but the net now takes \(3, 10, 10\)"
    ):
        attribution.compute(random_images(rng, net, 1), 0)


# ---- 3. the default Grad-CAM layer feeds the score ----


def _side_output_net(tmp_path, branch: str):
    """conv1 feeds a side output first (its first Split copy, or a Slice's first part) and the score
    after; global pooling makes every blob after the branch 1x1."""
    text = _input((3, 8, 8)) + conv("conv1", "data", 8) + layer("relu1", "ReLU", "conv1", "conv1")
    if branch == "split":
        text += fc("side", "conv1", 2) + layer("gap", "Pooling", "conv1", params=GAP)
        expected = "conv1"
    else:
        text += layer("slice", "Slice", "conv1", ["first", "second"], "slice_param { slice_point: 4 }")
        text += fc("side", "first", 2) + layer("gap", "Pooling", "second", params=GAP)
        expected = "second"
    text += fc("fc", "gap", 5) + layer("prob", "Softmax", "fc")
    return make_net(tmp_path, text), expected


@pytest.mark.parametrize("branch", ["split", "slice"])
def test_default_cam_layer_feeds_the_score(tmp_path, rng, branch):
    """The first 4-D top of the layer before the score was taken, though only the other one feeds it."""
    net, expected = _side_output_net(tmp_path, branch)
    images = random_images(rng, net, 2)
    default = fastsal.Attribution(net, "gradcam")
    assert default.layer == expected
    named = fastsal.Attribution(net, "gradcam", layer=expected)
    np.testing.assert_array_equal(default.compute(images, [0, 3]), named.compute(images, [0, 3]))


def test_default_cam_layer_is_not_one_copy_of_a_split(tmp_path, rng):
    """Both copies of conv1 feed the score: at one copy the gradient missed the other branch."""
    pool = "pooling_param { pool: MAX global_pooling: true }"
    text = (
        _input((3, 8, 8))
        + conv("conv1", "data", 4)
        + layer("relu1", "ReLU", "conv1", "conv1")
        + layer("gap", "Pooling", "conv1", params=GAP)
        + layer("gmp", "Pooling", "conv1", params=pool)
        + layer("cat", "Concat", ["gap", "gmp"])
        + fc("fc", "cat", 5)
    )
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 2)
    default = fastsal.Attribution(net, "gradcam")
    assert default.layer == "conv1"
    named = fastsal.Attribution(net, "gradcam", layer="conv1")
    np.testing.assert_array_equal(default.compute(images, [1, 4]), named.compute(images, [1, 4]))


# ---- 4. misleading errors ----


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_cam_with_unknown_score_is_a_value_error(net, method):
    """An IndexError came from the default layer's search."""
    with pytest.raises(ValueError, match="unknown score blob 'nope'"):
        fastsal.Attribution(net, method, score="nope")
    with pytest.raises(TypeError, match=r"score must be a blob name \(str\), got int"):
        fastsal.Attribution(net, method, score=3)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_refuses_k_beyond_the_classes(net, images, method):
    """The noise methods and IG returned all 7 columns for k=50; the others raised an engine message."""
    attribution = fastsal.Attribution(
        net, method, **({"n_steps": 2} if method == "integrated_gradients" else {})
    )
    with pytest.raises(ValueError, match="^k=50 exceeds the 7 classes of score blob 'fc'"):
        attribution.explain(images, None, 50)
    with pytest.raises(ValueError, match="^k=8 exceeds the 7 classes of score blob 'fc'"):
        attribution.compute_top_k(images, 8)


@pytest.mark.parametrize("method", METHODS)
def test_no_images_give_empty_results(net, method):
    """IG's convergence delta raised "need at least one array to concatenate"; every method and form
    returns arrays of the right shapes with N = 0, as Saliency.compute does."""
    options = {"n_steps": 2} if method == "integrated_gradients" else {}
    attribution = fastsal.Attribution(net, method, **options)
    none = np.empty((0, 3, 12, 12), np.float32)
    assert attribution.compute(none, [1, 2]).shape == (0, 2, 12, 12)
    maps, classes = attribution.compute_top_k(none, 3)
    assert maps.shape == (0, 3, 12, 12) and classes.shape == (0, 3)
    maps, classes, scores = attribution.explain(none, None, 2)
    assert (maps.shape, classes.shape, scores.shape) == ((0, 2, 12, 12), (0, 2), (0, 7))
    if method == "integrated_gradients":
        maps, delta = attribution.compute(none, [1, 2], return_convergence_delta=True)
        assert maps.shape == (0, 2, 12, 12) and delta.shape == (0, 2)
        maps, classes, delta = attribution.compute_top_k(none, 3, return_convergence_delta=True)
        assert (maps.shape, classes.shape, delta.shape) == ((0, 3, 12, 12), (0, 3), (0, 3))


@pytest.mark.parametrize(
    "option, value",
    [("stdev", float("inf")), ("stdev", 1e39), ("stdev", float("nan")), ("noise_level", 1e39)],
    ids=["stdev-inf", "stdev-1e39", "stdev-nan", "noise_level-1e39"],
)
def test_noise_beyond_float32_is_refused_as_an_option(net, option, value):
    """Accepted, then blamed on the image: "images[0] overflows float32 inside the net"."""
    with pytest.raises(ValueError, match=f"{option} must be a number >= 0 that float32 can hold"):
        fastsal.Attribution(net, "smoothgrad", **{option: value})


def test_noise_that_overflows_names_the_option(net, images):
    """A noise_level fine on its own times an image's range, or a stdev whose samples overflow."""
    relative = fastsal.Attribution(net, "smoothgrad", noise_level=1e38, samples=2, seed=0)
    with pytest.raises(
        ValueError, match=r"noise_level=1e\+38 times the range of images\[0\] .*beyond float32"
    ):
        relative.compute(images, 0)
    absolute = fastsal.Attribution(net, "vargrad", stdev=1e38, samples=4, seed=0)
    with pytest.raises(ValueError, match=r"\(stdev=1e\+38\) takes the samples of images\[0\] beyond float32"):
        absolute.compute(images, 0)


# ---- 5. names: the likely ones, not every blob of the net ----

# 40 blobs named alike, as a real net's are.
MANY_BLOBS = _input((2, 4, 4)) + "".join(
    conv(f"conv_{i}", "data" if i == 0 else f"conv_{i - 1}", 2, k=1, pad=0) for i in range(40)
)
MANY_BLOBS += fc("fc", "conv_39", 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda net: fastsal.Saliency(net, score="conv_12x"), "unknown score blob 'conv_12x'"),
        (lambda net: fastsal.compute(net, np.ones((1, 2, 4, 4)), 0, input="dta"), "unknown input blob 'dta'"),
        (lambda net: fastsal.Attribution(net, "gradcam", layer="conv_12x"), "unknown layer blob 'conv_12x'"),
        (lambda net: fastsal.Attribution(net, "gradcam", score="conv_12x"), "unknown score blob 'conv_12x'"),
        (
            lambda net: fastsal.dream(net, np.ones((2, 4, 4)), "conv_12x", octaves=1),
            "unknown layer blob 'conv_12x'",
        ),
    ],
    ids=["score", "input", "gradcam-layer", "gradcam-score", "dream-layer"],
)
def test_unknown_names_suggest_the_closest_blobs(tmp_path, make, message):
    """The message listed all 42 blobs on one line; dream called its layer a score blob."""
    net = make_net(tmp_path, MANY_BLOBS)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        make(net)
    text = str(error.value)
    assert "(net.blobs lists all 42 blobs)" in text
    assert "did you mean 'conv_12'" in text or "did you mean 'data'" in text
    assert len(text) < 200 and "conv_30" not in text


@pytest.mark.parametrize(
    "layer_blob, message",
    [
        ("fc", "layer blob 'fc' is the score blob itself; Grad-CAM needs a blob before it"),
        ("data", "layer blob 'data' is the input blob itself; Grad-CAM needs a blob between"),
    ],
)
def test_cam_at_the_score_or_input_blob_says_so(net, layer_blob, message):
    """Both said the blob "is not between" the input and the score, which it is one end of."""
    with pytest.raises(ValueError, match=message):
        fastsal.Attribution(net, "gradcam", layer=layer_blob)


# ---- 6. OpenBLAS's thread count, process-wide ----


def test_readme_says_what_a_concurrent_pycaffe_forward_sees():
    """fastsal sets OpenBLAS to one thread process-wide while a split product runs: the README says
    what another thread's pycaffe forward gets meanwhile, and how to avoid it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    bullet = next(part for part in readme.split("\n- ") if "openblas_set_num_threads" in part)
    for words in ("another thread", "one thread", "last bit", "fast_layers=False", "not concurrently"):
        assert words in " ".join(bullet.split()), words


def test_the_readme_s_submodules_are_reached_from_import_fastsal():
    """README writes fastsal.examples.digits_net(), fastsal.jobs.run_job(...): after a plain
    ``import fastsal`` they are there (imported on first use: torch only with fastsal.torch_port)."""
    done = run_isolated(
        """
        import sys, fastsal
        assert callable(fastsal.examples.digits_net) and callable(fastsal.jobs.run_job)
        assert callable(fastsal.report.write_report) and "torch" not in sys.modules
        try:
            fastsal.no_such_thing
        except AttributeError as error:
            assert "no_such_thing" in str(error)
        else:
            raise AssertionError("fastsal.no_such_thing did not raise")
        print("OK")
        """
    )
    assert done.stdout.strip() == "OK", done.stderr[-2000:]
