"""fastsal.compute against its oracles: the seed recipe through pycaffe, and finite differences."""

from __future__ import annotations

import gc
import threading

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
    write,
)


@pytest.mark.parametrize("batch_size", [1, 2, 3, None], ids=lambda b: f"batch{b}")
def test_matches_seed_recipe_per_image_classes(small_net, rng, batch_size):
    net, path, score = small_net
    images = random_images(rng, net, 5)  # 5: not a multiple of 2 or 3
    num_classes = net.blobs[score].data[0].size
    classes = rng.integers(0, num_classes, size=(5, 3))
    maps = fastsal.compute(net, images, classes, batch_size=batch_size)
    reference, _ = seed_recipe(net, path, images, classes, score)
    assert maps.shape == reference.shape and maps.dtype == np.float32
    assert_close_to_reference(maps, reference)


def test_matches_seed_recipe_every_class(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 3)
    num_classes = net.blobs[score].data[0].size
    maps = fastsal.compute(net, images, range(num_classes))
    reference, _ = seed_recipe(net, path, images, np.tile(np.arange(num_classes), (3, 1)), score)
    assert_close_to_reference(maps, reference)


def test_raw_gradients_match_seed_recipe_and_reduce_to_maps(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 3)
    grads = fastsal.compute(net, images, [0, 1], gradients=True)
    maps = fastsal.compute(net, images, [0, 1])
    _, reference = seed_recipe(net, path, images, np.tile([0, 1], (3, 1)), score)
    assert grads.shape == (3, 2, *images.shape[1:])
    assert_close_to_reference(grads, reference)
    np.testing.assert_array_equal(np.abs(grads).max(axis=2), maps)


@pytest.mark.parametrize("n", [1, 2, 7], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("k", [1, 4], ids=lambda k: f"K{k}")
def test_streaming_edges(tmp_path, rng, n, k):
    text, score = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text, seed=3)
    images = random_images(rng, net, n)
    classes = rng.integers(0, 7, size=(n, k))
    maps = fastsal.Saliency(net, batch_size=2).compute(images, classes)
    reference, _ = seed_recipe(net, str(tmp_path / "net.prototxt"), images, classes, score)
    assert maps.shape == (n, k, 12, 12)
    assert_close_to_reference(maps, reference)


def test_fast_layers_agree_with_caffes_own(small_net, rng):
    """fastsal's CPU layers (oneDNN backward-data convolution, masked ReLU) against Caffe's own code."""
    net, _, score = small_net
    images = random_images(rng, net, 3)
    fast = fastsal.Saliency(net, batch_size=2).compute(images, [0, 1], gradients=True)
    stock = fastsal.Saliency(net, batch_size=2, fast_layers=False).compute(images, [0, 1], gradients=True)
    assert_close_to_reference(fast, stock)


def test_finite_differences_on_a_smooth_net(tmp_path, rng):
    """Central differences of the score through pycaffe's own forward, on a net with no kinks."""
    text = (
        _input((2, 5, 5), batch=1)
        + conv("conv", "data", 3)
        + layer("tanh", "TanH", "conv")
        + layer("pool", "Pooling", "tanh", params="pooling_param { pool: AVE kernel_size: 2 stride: 1 }")
        + fc("score", "pool", 3)
    )
    net = make_net(tmp_path, text, seed=7)
    image = rng.standard_normal((2, 5, 5))
    grads = fastsal.compute(net, image, [0, 2], gradients=True)  # single image: (K, C, H, W)
    eps = 1e-2
    numeric = np.zeros(grads.shape)
    for index in np.ndindex(*image.shape):
        for sign in (1, -1):
            shifted = image.copy()
            shifted[index] += sign * eps
            net.blobs["data"].data[0] = shifted
            scores = net.forward()["score"][0].astype(np.float64)
            numeric[(slice(None), *index)] += sign * scores[[0, 2]] / (2 * eps)
    np.testing.assert_allclose(grads, numeric, rtol=2e-3, atol=2e-3 * np.abs(numeric).max())
    maps = fastsal.compute(net, image, [0, 2])
    np.testing.assert_allclose(
        maps, np.abs(numeric).max(axis=1), rtol=2e-3, atol=2e-3 * np.abs(numeric).max()
    )


def test_class_forms_agree(tmp_path, rng):
    text, _ = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 3)
    by_rows = fastsal.compute(net, images, np.array([[4], [4], [4]]))
    np.testing.assert_array_equal(fastsal.compute(net, images, 4), by_rows)
    np.testing.assert_array_equal(fastsal.compute(net, images, [4]), by_rows)
    np.testing.assert_array_equal(fastsal.compute(net, images, np.int16(4)), by_rows)
    np.testing.assert_array_equal(fastsal.compute(net, images, (4,)), by_rows)
    pair = fastsal.compute(net, images, [2, 5])
    np.testing.assert_array_equal(pair[:, :1], fastsal.compute(net, images, 2))
    np.testing.assert_array_equal(pair[:, 1:], fastsal.compute(net, images, 5))
    assert np.abs(pair[:, 0] - pair[:, 1]).max() > 0  # two classes, two different maps


def test_single_image_drops_the_batch_axis(tmp_path, rng):
    text, _ = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 2)
    single = fastsal.compute(net, images[1], [1, 3])
    assert single.shape == (2, 12, 12)
    np.testing.assert_array_equal(single, fastsal.compute(net, images, [1, 3])[1])


def test_any_real_dtype_and_memory_order(tmp_path, rng):
    text, _ = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 3)
    expected = fastsal.compute(net, images, 2)
    np.testing.assert_array_equal(fastsal.compute(net, images.astype(np.float64), 2), expected)
    np.testing.assert_array_equal(fastsal.compute(net, np.asfortranarray(images), 2), expected)
    strided = np.repeat(images, 2, axis=0)[::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(fastsal.compute(net, strided, 2), expected)
    integers = (images * 10).astype(np.int16)
    np.testing.assert_array_equal(
        fastsal.compute(net, integers, 2), fastsal.compute(net, integers.astype(np.float32), 2)
    )
    np.testing.assert_array_equal(fastsal.compute(net, images.tolist(), 2), expected)


def test_top_k_picks_the_best_scores(tmp_path, rng):
    text, score = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 4)
    maps, classes = fastsal.compute_top_k(net, images, 3)
    net.blobs["data"].reshape(*images.shape)
    scores = net.forward(data=images, end="fc")["fc"]
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(classes, expected)
    assert classes.dtype == np.int64
    np.testing.assert_array_equal(maps, fastsal.compute(net, images, classes))
    single_maps, single_classes = fastsal.compute_top_k(net, images[2], 2)
    np.testing.assert_array_equal(single_classes, expected[2, :2])
    assert single_maps.shape == (2, 12, 12)


def test_user_net_is_left_as_it_was(tmp_path, rng):
    text, _ = NETS["resnet_block_bn_scale_eltwise"]
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 2)
    params_before = {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}
    shapes_before = {name: blob.data.shape for name, blob in net.blobs.items()}
    out_before = net.forward(data=images)["prob"].copy()

    fastsal.compute(net, random_images(rng, net, 5), [0, 1, 2], batch_size=3)

    assert {name: blob.data.shape for name, blob in net.blobs.items()} == shapes_before
    for name, blobs in net.params.items():
        for before, blob in zip(params_before[name], blobs):
            np.testing.assert_array_equal(blob.data, before)
    np.testing.assert_array_equal(net.forward(data=images)["prob"], out_before)


def test_engine_shares_weights_and_outlives_the_net(tmp_path, rng):
    text, score = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 2)
    saliency = fastsal.Saliency(net)
    before = saliency.compute(images, 1)
    net.params["fc"][0].data[...] *= 2  # shared memory: the engine sees the user's change
    np.testing.assert_allclose(saliency.compute(images, 1), 2 * before, rtol=1e-5)
    expected = saliency.compute(images, 1)
    del net
    gc.collect()
    np.testing.assert_array_equal(saliency.compute(images, 1), expected)


def test_compute_caches_one_engine_per_net_without_keeping_it_alive(tmp_path, rng):
    from fastsal import _saliency

    text, _ = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 1)
    fastsal.compute(net, images, 0)
    fastsal.compute(net, images, 1)
    assert len(_saliency._cache[net]) == 1
    count = len(_saliency._cache)
    del net
    gc.collect()
    assert len(_saliency._cache) == count - 1


def test_concurrent_threads_get_sequential_results(tmp_path, rng):
    text, _ = NETS["resnet_block_bn_scale_eltwise"]
    nets = [make_net(tmp_path, text, seed=s) for s in (1, 2)]
    jobs = [(nets[i % 2], random_images(rng, nets[0], 3), [i % 5, (i + 2) % 5]) for i in range(8)]
    expected = [fastsal.compute(net, images, classes) for net, images, classes in jobs]
    results = [None] * len(jobs)

    def work(i):
        net, images, classes = jobs[i]
        results[i] = fastsal.compute(net, images, classes)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_softmax_default_score_and_properties(tmp_path):
    text, _ = NETS["conv_maxpool_fc_softmax"]
    saliency = fastsal.Saliency(make_net(tmp_path, text), batch_size=4)
    assert (saliency.score, saliency.input, saliency.image_shape) == ("fc", "data", (3, 12, 12))
    assert (saliency.num_classes, saliency.batch_size) == (7, 4)
    only_output = fastsal.Saliency(make_net(tmp_path, NETS["inception_concat_lrn_no_softmax"][0]))
    assert only_output.score == "score"


def test_explicit_score_and_input_blobs(tmp_path, rng):
    """Differentiate an intermediate blob, in a net whose old-style input is not called 'data'."""
    text = (
        'input: "pixels" input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }\n'
        + conv("conv", "pixels", 4)
        + layer("relu", "ReLU", "conv", "conv")
        + fc("hidden", "conv", 6)
        + fc("out", "hidden", 3)
    )
    path = write(tmp_path, text)
    net = caffe.Net(path, caffe.TEST)
    from conftest import randomize_weights

    randomize_weights(net, 5)
    images = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    maps = fastsal.compute(net, images, [[5], [0]], score="hidden", input="pixels")
    reference, _ = seed_recipe(net, path, images, [[5], [0]], "hidden", input_blob="pixels")
    assert_close_to_reference(maps, reference)
