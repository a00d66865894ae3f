"""The GPU path: what runs without a GPU is tested here on the CPU (the batch-layout rule, the (image,
class) pairs layout against the seed recipe, device= handling); the rest needs a CUDA build and a GPU."""

from __future__ import annotations

import numpy as np
import pytest

import fastsal
from conftest import NETS, assert_close_to_reference, make_net, random_images, seed_recipe
from fastsal import _core

needs_gpu = pytest.mark.skipif(
    fastsal.cuda_device_count() == 0,
    reason="needs a GPU and a CUDA build: run scripts/setup.sh --cuda on a machine with one"
    if not fastsal.has_cuda()
    else "fastsal has CUDA, but no CUDA device is visible",
)


@pytest.mark.parametrize(
    "layout, on_gpu, n, k, batch, expected",
    [
        ("auto", False, 3, 10, 16, ("per_class", 16)),  # CPU: a repeated image costs a full forward
        ("auto", True, 3, 10, 16, ("pairs", 16)),  # GPU, few images: fill the batch with pairs
        ("auto", True, 4, 4, 16, ("pairs", 16)),
        ("auto", True, 16, 4, 16, ("per_class", 16)),  # GPU already full of images
        ("auto", True, 3, 1, 16, ("per_class", 16)),  # one class: nothing to pair
        ("pairs", False, 8, 3, 8, ("pairs", 8)),
        ("pairs", True, 2, 40, 16, ("pairs", 16)),  # more classes than the batch: K spans passes
        ("per_class", True, 1, 5, 16, ("per_class", 16)),
    ],
)
def test_batch_layout_rule(layout, on_gpu, n, k, batch, expected):
    assert _core.plan_batches(layout, on_gpu, n, k, batch) == expected


def test_pairs_layout_matches_seed_recipe(small_net, rng):
    """Each image repeated K times with a genuine forward: exact even with MaxPool, LRN, BatchNorm,
    PReLU and Eltwise MAX, whose backward reads per-batch state."""
    net, path, score = small_net
    images = random_images(rng, net, 5)
    num_classes = net.blobs[score].data[0].size
    classes = rng.integers(0, num_classes, size=(5, 3))
    saliency = fastsal.Saliency(net, batch_size=4, batch_layout="pairs")  # 4 pairs, 2 images, per pass
    maps = saliency.compute(images, classes)
    grads = saliency.compute(images, classes, gradients=True)
    reference, reference_grads = seed_recipe(net, path, images, classes, score)
    assert_close_to_reference(maps, reference)
    assert_close_to_reference(grads, reference_grads)


def test_pairs_layout_top_k(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 3)
    per_class = fastsal.Saliency(net, batch_layout="per_class").compute_top_k(images, 3)
    pairs = fastsal.Saliency(net, batch_size=6, batch_layout="pairs").compute_top_k(images, 3)
    np.testing.assert_array_equal(pairs[1], per_class[1])
    assert_close_to_reference(pairs[0], per_class[0])


def test_device_argument(tmp_path):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    assert fastsal.Saliency(net).device is None
    for bad in (-1, True, "cuda:0", 1.0):
        with pytest.raises(ValueError, match="device must be None \\(the CPU\\) or a CUDA device index >= 0"):
            fastsal.Saliency(net, device=bad)
    with pytest.raises(
        ValueError, match="batch_layout must be one of 'auto', 'per_class', 'pairs', got 'rows'"
    ):
        fastsal.Saliency(net, batch_layout="rows")
    count = fastsal.cuda_device_count()
    if not fastsal.has_cuda():
        with pytest.raises(ValueError, match="device=0, but fastsal and its Caffe were built without CUDA"):
            fastsal.Saliency(net, device=0)
    else:
        with pytest.raises(ValueError, match=f"device={count}, but "):
            fastsal.Saliency(net, device=count)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["per_class", "pairs"])
def test_gpu_matches_seed_recipe(small_net, rng, layout):
    net, path, score = small_net
    images = random_images(rng, net, 5)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(5, 3))
    saliency = fastsal.Saliency(net, device=0, batch_size=4, batch_layout=layout)
    reference, _ = seed_recipe(net, path, images, classes, score)
    assert_close_to_reference(saliency.compute(images, classes), reference)


@pytest.mark.gpu
@needs_gpu
def test_gpu_open_nsfw_matches_seed_recipe_and_restores_caffe_mode():
    import caffe

    from fastsal import examples

    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    images = examples.open_nsfw_batch()[0]
    caffe.set_mode_cpu()
    maps, top = fastsal.Saliency(net, device=0).compute_top_k(images, 2)
    assert _core.caffe_mode() == "CPU"  # the caller's mode, restored
    reference, _ = seed_recipe(net, str(prototxt), images, top, "fc_nsfw")
    assert_close_to_reference(maps, reference)
    cpu_maps = fastsal.Saliency(net).compute(images, top)
    assert_close_to_reference(cpu_maps, reference)


@pytest.mark.gpu
@needs_gpu
def test_gpu_call_restores_the_callers_device_and_mode(tmp_path, rng):
    import caffe

    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 2)
    last = fastsal.cuda_device_count() - 1
    caffe.set_mode_gpu()
    caffe.set_device(last)
    try:
        fastsal.Saliency(net, device=0).compute(images, 1)
        assert (_core.caffe_mode(), _core.cuda_current_device()) == ("GPU", last)
    finally:
        caffe.set_mode_cpu()


@pytest.mark.gpu
@needs_gpu
def test_gpu_weights_on_another_device_are_refused(tmp_path, rng):
    if fastsal.cuda_device_count() < 2:
        pytest.skip("needs two GPUs")
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 2)
    fastsal.Saliency(net, device=0).compute(images, 1)  # uploads the shared weights to device 0
    with pytest.raises(ValueError, match="the net's weights are on CUDA device 0"):
        fastsal.Saliency(net, device=1).compute(images, 1)
