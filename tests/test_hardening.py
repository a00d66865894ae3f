"""Inputs that used to abort the interpreter, corrupt memory or silently give wrong maps; each test here
failed on the engine before the hardening work. Aborts are tried in a child interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import warnings
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
    randomize_weights,
    resnet_block,
    seed_recipe,
    write,
)
from fastsal import _core, _saliency

TESTS = Path(__file__).resolve().parent


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter that can import conftest: an abort there cannot take pytest down."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
    )


# ---- aborts and memory corruption ----

HUGE_IMAGES = """
    import gc, numpy as np, fastsal
    from conftest import NETS, make_net, random_images
    import tempfile, pathlib
    net = make_net(pathlib.Path(tempfile.mkdtemp()), NETS["conv_maxpool_fc_softmax"][0])
    refused = 0
    for attempt in range(20):
        images = {images}
        try:
            fastsal.compute(net, images, [0, 1])
        except ValueError as error:
            refused += 1
            message = str(error)
        gc.collect()
    print("refused", refused)
    print(message)
"""


@pytest.mark.parametrize(
    "images, message",
    [
        (
            "np.where(np.arange(3)[None, :, None, None] % 2 == 0, 3e38, -3e38)"
            " * np.ones((2, 3, 12, 12), np.float32)",
            r"images\[0\] overflows float32 inside the net",
        ),
        ("np.full((2, 3, 12, 12), 1e39)", r"images\[0\] contains NaN or Inf once converted to float32"),
    ],
    ids=["float32-3e38", "float64-1e39"],
)
def test_images_that_overflow_are_refused_not_fatal(images, message):
    result = run_isolated(HUGE_IMAGES.format(images=images))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused 20" in result.stdout
    assert __import__("re").search(message, result.stdout), result.stdout


def test_overflow_is_found_per_image_and_loses_nothing(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 5)
    expected = fastsal.compute(net, images, [1, 2], batch_size=2)
    bad = images.copy()
    bad[3, 0], bad[3, 1] = 3e38, -3e38
    with pytest.raises(ValueError, match=r"images\[3\] overflows float32 inside the net"):
        fastsal.compute(net, bad, [1, 2], batch_size=2)
    np.testing.assert_array_equal(fastsal.compute(net, images, [1, 2], batch_size=2), expected)


WIDE = (
    _input((3, 128, 128), batch=1)
    + conv("conv", "data", 4)
    + layer("relu", "ReLU", "conv", "conv")
    + layer("gap", "Pooling", "conv", params="pooling_param { pool: AVE global_pooling: true }")
    + fc("fc", "gap", 2000)
)


def test_pairs_layout_keeps_memory_bounded_by_batch_size():
    """K = 2000 classes at batch_size=1: a pass holds one (image, class) pair, not 2000 of them."""
    result = run_isolated(
        f"""
        import resource, tempfile, pathlib, numpy as np, fastsal
        from conftest import make_net
        net = make_net(pathlib.Path(tempfile.mkdtemp()), {WIDE!r})
        image = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
        saliency = fastsal.Saliency(net, batch_size=1, batch_layout="pairs")
        saliency.compute(image, [0, 1])  # the net at its working size
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        maps = saliency.compute(image, np.arange(2000))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("grown_kib", grown, "shape", maps.shape)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    grown = int(result.stdout.split()[1])
    assert "shape (1, 2000, 128, 128)" in result.stdout
    assert grown < 250 * 1024, f"peak memory grew by {grown} KiB"  # the maps alone are 125 MiB


@pytest.mark.parametrize("batch_size, k", [(2, 5), (4, 3), (7, 3)], ids=["B2K5", "B4K3", "B7K3"])
def test_pairs_layout_with_several_images_and_classes_split_across_passes(small_net, rng, batch_size, k):
    """(image, class) pairs fill each pass: images share a pass, and an image's classes span passes."""
    net, path, score = small_net
    images = random_images(rng, net, 5)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(5, k))
    saliency = fastsal.Saliency(net, batch_size=batch_size, batch_layout="pairs")
    reference, reference_grads = seed_recipe(net, path, images, classes, score)
    assert_close_to_reference(saliency.compute(images, classes), reference)
    assert_close_to_reference(saliency.compute(images, classes, gradients=True), reference_grads)
    top_k = min(k, saliency.num_classes)
    maps, top = saliency.compute_top_k(images, top_k)
    per_class = fastsal.Saliency(net, batch_layout="per_class").compute_top_k(images, top_k)
    np.testing.assert_array_equal(top, per_class[1])
    assert_close_to_reference(maps, per_class[0])


# ---- silently wrong maps ----


def _head(softmax: str) -> str:
    return (
        _input((3, 8, 8))
        + conv("conv", "data", 4)
        + layer("relu", "ReLU", "conv", "conv")
        + fc("fc", "conv", 5)
        + softmax
    )


def test_in_place_softmax_default_score_is_the_logits(tmp_path, rng):
    in_place = _head(layer("prob", "Softmax", "fc", "fc"))
    net = make_net(tmp_path, in_place, seed=4)
    images = random_images(rng, net, 3)
    saliency = fastsal.Saliency(net)
    assert saliency.score == "fc"
    # The oracle: the same weights in the net without its Softmax, differentiated at 'fc'.
    logits_path = write(tmp_path, _head(""), "logits.prototxt")
    logits_net = caffe.Net(logits_path, caffe.TEST)
    logits_net.share_with(net)
    classes = np.tile([0, 3], (3, 1))
    reference, _ = seed_recipe(logits_net, logits_path, images, classes, "fc")
    assert_close_to_reference(saliency.compute(images, [0, 3]), reference)
    assert_close_to_reference(fastsal.Saliency(net, score="fc").compute(images, [0, 3]), reference)


def test_two_softmax_heads_make_the_default_ambiguous(tmp_path):
    text = _head(layer("prob", "Softmax", "fc")) + fc("aux", "conv", 3) + layer("aux_prob", "Softmax", "aux")
    net = make_net(tmp_path, text)
    with pytest.raises(ValueError, match=r"2 Softmax outputs, on 'fc' \(under layer 'prob'.*'aux'.*score="):
        fastsal.Saliency(net)
    assert fastsal.Saliency(net, score="aux").num_classes == 3


def test_score_rewritten_in_place_warns(tmp_path, rng):
    text = (
        _input((3, 8, 8))
        + conv("conv", "data", 4)
        + fc("fc", "conv", 5)
        + layer("relu_fc", "ReLU", "fc", "fc")
    )
    net = make_net(tmp_path, text)
    with pytest.warns(
        UserWarning, match=r"score blob 'fc' is rewritten in place by layer 'relu_fc' \(ReLU\)"
    ):
        saliency = fastsal.Saliency(net, score="fc")
    images = random_images(rng, net, 2)
    reference, _ = seed_recipe(net, str(tmp_path / "net.prototxt"), images, np.tile([1], (2, 1)), "fc")
    np.testing.assert_allclose(saliency.compute(images, 1), reference, atol=1e-6)
    with pytest.warns(UserWarning, match="rewritten in place") as caught:  # through compute's cache too
        fastsal.compute(net, images, 1, score="fc")
    assert [w.filename for w in caught if "rewritten in place" in str(w.message)] == [__file__]


# ---- stale or refused where the user did nothing wrong ----


def test_input_reshaped_to_another_batch_before_forward(tmp_path, rng):
    path = write(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    net.blobs["data"].reshape(4, 3, 12, 12)  # the usual pycaffe step, before net.reshape() or forward
    images = random_images(rng, net, 3)
    reference, _ = seed_recipe(net, path, images, np.tile([2], (3, 1)), "fc")
    assert_close_to_reference(fastsal.compute(net, images, 2), reference)


# A net whose weights fit any image size (global pooling before the classifier).
ANY_SIZE = (
    _input((3, 10, 10))
    + conv("conv", "data", 4)
    + layer("relu", "ReLU", "conv", "conv")
    + layer("pool", "Pooling", "conv", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    + layer("gap", "Pooling", "pool", params="pooling_param { pool: AVE global_pooling: true }")
    + fc("fc", "gap", 3)
)


def test_cache_follows_net_reshape_to_another_image_size(tmp_path, rng):
    net = make_net(tmp_path, ANY_SIZE)
    fastsal.compute(net, random_images(rng, net, 2), 1)
    net.blobs["data"].reshape(2, 3, 16, 14)
    net.reshape()
    images = random_images(rng, net, 2)
    maps = fastsal.compute(net, images, 1)
    assert maps.shape == (2, 1, 16, 14)
    reference, _ = seed_recipe(net, str(tmp_path / "net.prototxt"), images, np.tile([1], (2, 1)), "fc")
    assert_close_to_reference(maps, reference)


def test_cache_follows_share_with(tmp_path, rng):
    net = make_net(tmp_path, ANY_SIZE, seed=1)
    other = make_net(tmp_path, ANY_SIZE, seed=2)
    images = random_images(rng, net, 2)
    before = fastsal.compute(net, images, 0)
    expected = fastsal.compute(other, images, 0)
    assert np.abs(before - expected).max() > 1e-3  # different weights, different maps
    net.share_with(other)
    np.testing.assert_array_equal(fastsal.compute(net, images, 0), expected)
    saliency = fastsal.Saliency(net)
    np.testing.assert_array_equal(saliency.compute(images, 0), expected)
    randomize_weights(other, 3)  # shared memory: seen by the engine built on either net
    np.testing.assert_array_equal(saliency.compute(images, 0), fastsal.compute(other, images, 0))


def test_weights_that_do_not_fit_the_reshaped_input_are_refused(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    net.blobs["data"].reshape(1, 3, 16, 16)  # its fc weights take 12x12 images only
    with pytest.raises(ValueError, match=r"images of shape \(3, 16, 16\) need layer 'fc' \(InnerProduct\)"):
        fastsal.Saliency(net)


def test_cache_is_bounded_per_net(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 2)
    for batch_size in range(1, 41):
        fastsal.compute(net, images, 0, batch_size=batch_size)
    assert len(_saliency._cache[net]) == 1


def test_in_place_layer_on_the_input(tmp_path, rng):
    text = (
        _input((3, 8, 8))
        + layer("scale_in", "Power", "data", "data", "power_param { scale: 0.5 shift: 0.1 }")
        + conv("conv", "data", 4)
        + layer("relu", "ReLU", "conv", "conv")
        + fc("fc", "conv", 3)
    )
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 3)
    reference, _ = seed_recipe(net, str(tmp_path / "net.prototxt"), images, np.tile([0, 2], (3, 1)), "fc")
    assert_close_to_reference(fastsal.compute(net, images, [0, 2]), reference)


def test_default_batch_size_follows_the_memory_budget(tmp_path):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    per_image = fastsal.Saliency(net, batch_size=1).bytes_per_image
    # At least data + diff of every blob the score needs (pycaffe's view of one image).
    blobs = ["data", "conv1", "pool1", "conv2", "pool2", "fc"]
    assert per_image >= sum(8 * net.blobs[b].data[0].size for b in blobs)
    assert fastsal.Saliency(net, memory_budget=3 * per_image + 1).batch_size == 3
    assert fastsal.Saliency(net, memory_budget=1).batch_size == 1
    assert fastsal.Saliency(net, memory_budget=10**12).batch_size == 16
    # The user's current batch size does not matter, even 0.
    net.blobs["data"].reshape(0, 3, 12, 12)
    assert fastsal.Saliency(net, memory_budget=3 * per_image + 1).batch_size == 3


# A ResNet block at a size where every per-row buffer is megabytes: BatchNorm and Scale in place, a
# Split (the shortcut), Eltwise, ReLU masks, max pooling's indices, oneDNN's blocked copies.
RESNET_STAGE = resnet_block((3, 96, 96), 32, "pooling_param { pool: MAX kernel_size: 2 stride: 2 }", batch=1)


@pytest.mark.parametrize(
    "options", [{}, {"exact": False}, {"fast_layers": False}], ids=["exact", "inexact", "caffe_layers"]
)
def test_bytes_per_image_is_what_a_batch_row_costs(options):
    """The default batch size is memory_budget / bytes_per_image, so the estimate must be what each
    extra row really allocates: it counted Caffe's BatchNorm and Scale buffers that fastsal's layers do
    not keep and the Split tops' shared data (1.8x open_nsfw's real cost, half its batch), and missed
    the oneDNN copies (VGG-16 15% under)."""
    result = run_isolated(
        f"""
        import tempfile, pathlib, numpy as np, fastsal
        from conftest import make_net
        net = make_net(pathlib.Path(tempfile.mkdtemp()), {RESNET_STAGE!r})
        saliency = fastsal.Saliency(net, batch_size=9, **{options!r})
        images = np.random.default_rng(0).standard_normal((9, 3, 96, 96)).astype(np.float32)
        def rss():
            status = pathlib.Path("/proc/self/status").read_text().split("\\n")
            return 1024 * int(next(l for l in status if l.startswith("VmRSS")).split()[1])
        saliency.compute(images[:1], [0, 1])
        saliency.compute(images[:1], [0, 1])  # the net at batch 1, every buffer touched
        before = rss()
        saliency.compute(images, [0, 1])
        print((rss() - before) / 8 / saliency.bytes_per_image)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ratio = float(result.stdout.split()[-1])
    assert 0.8 < ratio < 1.25, f"a batch row costs {ratio:.2f}x the estimate"


@pytest.mark.parametrize(
    "units, cap, rows",
    [(8, 7, 4), (8, 8, 8), (8, 16, 8), (17, 16, 9), (10, 4, 4), (1, 16, 1), (33, 16, 11), (0, 5, 5)],
)
def test_passes_are_as_even_as_the_cap_allows(units, cap, rows):
    assert fastsal._core.balanced_rows(units, cap) == rows
    slices = fastsal._saliency.batch_slices(units, cap)
    sizes = [len(range(units)[s]) for s in slices]
    assert sum(sizes) == units and max(sizes, default=0) <= cap
    assert len(slices) == -(-units // cap)  # no more passes than the cap needs


def test_uneven_batches_give_the_same_maps(tmp_path, rng):
    """8 images at batch_size 7 run as 4 + 4 (and their 16 (image, class) pairs in the GPU-style layout
    as 6 + 6 + 4): the maps are those of one pass per image."""
    net = make_net(tmp_path, NETS["resnet_block_bn_scale_eltwise"][0])
    images = random_images(rng, net, 8)
    one_by_one = np.concatenate(
        [fastsal.Saliency(net, batch_size=1).compute(images[i : i + 1], [0, 3]) for i in range(8)]
    )
    for options in ({"batch_size": 7}, {"batch_size": 7, "batch_layout": "pairs"}):
        np.testing.assert_allclose(
            fastsal.Saliency(net, **options).compute(images, [0, 3]), one_by_one, rtol=0, atol=1e-6
        )


def test_top_k_ties_go_to_the_lower_class(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    weights, bias = net.params["fc"][0].data, net.params["fc"][1].data
    weights[5], weights[2] = weights[1], weights[1]  # classes 1, 2 and 5 always score the same
    bias[1] = bias[2] = bias[5] = 100.0  # and the most
    maps, top = fastsal.compute_top_k(net, random_images(rng, net, 3), 3)
    np.testing.assert_array_equal(top, np.tile([1, 2, 5], (3, 1)))
    pairs = fastsal.Saliency(net, batch_size=2, batch_layout="pairs")
    np.testing.assert_array_equal(pairs.compute_top_k(random_images(rng, net, 3), 3)[1], top)


THREADED = (
    _input((3, 128, 128))
    + conv("conv", "data", 4)
    + layer("relu", "ReLU", "conv", "conv")
    + layer("pool", "Pooling", "conv", params="pooling_param { pool: MAX kernel_size: 4 stride: 4 }")
    + fc("fc", "pool", 3)
)


def test_threaded_relu_and_reduction_match_the_seed_recipe(tmp_path, rng):
    """Batches big enough for the OpenMP branches of the ReLU (>= 2**16 values) and the abs-max (>= 2**17
    output pixels), which the small nets never reach."""
    net = make_net(tmp_path, THREADED)
    images = random_images(rng, net, 8)
    assert 8 * 4 * 128 * 128 >= 2**16 and 8 * 128 * 128 >= 2**17
    maps = fastsal.Saliency(net, batch_size=8).compute(images, [0, 2])
    reference, _ = seed_recipe(net, str(tmp_path / "net.prototxt"), images, np.tile([0, 2], (8, 1)), "fc")
    assert_close_to_reference(maps, reference)


# ---- Caffe's per-thread state ----


def test_caffe_mode_is_restored_after_a_call(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 2)
    caffe.set_mode_gpu()  # only a flag until a GPU call: fastsal runs this engine on the CPU
    try:
        fastsal.Saliency(net).compute(images, 1)
        assert _core.caffe_mode() == "GPU"
    finally:
        caffe.set_mode_cpu()
    fastsal.Saliency(net).compute(images, 1)
    assert _core.caffe_mode() == "CPU"


def test_gil_is_released_during_the_engine_call(tmp_path, rng):
    """One engine call (all images in one batch): the main thread keeps ticking while it runs, which it
    could not if the call held the GIL."""
    net = make_net(tmp_path, THREADED)
    images = random_images(rng, net, 32)
    saliency = fastsal.Saliency(net, batch_size=32)
    saliency.compute(images, 0)  # warm up
    engine = saliency._engine
    span = {}
    original = engine.compute

    class Timed:
        def __getattr__(self, name):
            return getattr(engine, name)

        def compute(self, *args, **options):
            span["start"] = time.perf_counter()
            original(*args, **options)
            span["end"] = time.perf_counter()

    saliency._engine = Timed()
    ticks = []
    worker = threading.Thread(target=saliency.compute, args=(images, [0, 1, 2]))
    with warnings.catch_warnings():
        worker.start()
        while worker.is_alive():
            ticks.append(time.perf_counter())
        worker.join()
    start, end = span["start"], span["end"]
    during = [start] + [t for t in ticks if start < t < end] + [end]
    longest_wait = max(b - a for a, b in zip(during, during[1:]))
    # Held, the GIL would stop the main thread for the whole call: one gap as long as the call.
    assert end - start > 0.05
    assert longest_wait < 0.5 * (end - start), (
        f"main thread stalled {longest_wait:.3f} s of {end - start:.3f} s"
    )
