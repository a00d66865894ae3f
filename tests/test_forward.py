"""The forward-only path every perturbation method and metric runs on, checked against pycaffe's own
forward (net.forward, and net.forward(start=...) for a forward from a layer blob)."""

import numpy as np
import pytest

from conftest import NETS, assert_close_to_reference, make_net, producer_layer, random_images
from fastsal._forward import Forward, softmax


def pycaffe_forward(net, images, score, layer=None, start=None, values=None):
    net.blobs["data"].reshape(*images.shape)
    net.reshape()
    net.blobs["data"].data[...] = images
    net.forward()
    if values is not None:
        net.blobs[layer].data[...] = values
        net.forward(start=start)
    return net.blobs[score].data.copy(), None if layer is None else net.blobs[layer].data.copy()


def test_scores_are_pycaffe_forward(small_net, rng):
    net, _, score = small_net
    images = random_images(rng, net, 5)
    forward = Forward(net, score=score, batch_size=2)
    expected, _ = pycaffe_forward(net, images, score)
    # Caffe's own arithmetic at another batch size: its BLAS may block the products differently.
    assert_close_to_reference(forward.scores(images), expected.reshape(len(images), -1), rtol=1e-5)


def test_a_forward_only_engine_counts_no_diffs(tmp_path):
    import fastsal

    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    gradient = fastsal.Saliency(net, score="fc")
    forward = Forward(net, score="fc")
    assert forward._engine.bytes_per_image < gradient.bytes_per_image  # data only: no diffs


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "inexact"])
def test_from_layer_runs_only_the_layers_above(tmp_path, rng, exact):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 5)
    forward = Forward(net, score="fc", layer="pool1", batch_size=2, exact=exact)
    values, scores = forward.activations(images)
    expected_scores, expected_values = pycaffe_forward(net, images, "fc", "pool1")
    tolerance = 1e-5 if exact else 1e-4
    np.testing.assert_allclose(values, expected_values, atol=tolerance * np.abs(expected_values).max())
    np.testing.assert_allclose(scores, expected_scores, atol=tolerance * np.abs(expected_scores).max())
    # Channel 2 ablated: pycaffe's forward from the layer after pool1's last writer.
    ablated = values.copy()
    ablated[:, 2] = 0
    start = list(net._layer_names)[list(net._layer_names).index(producer_layer(net, "pool1")) + 1]
    expected, _ = pycaffe_forward(net, images, "fc", "pool1", start, ablated)
    out = np.empty_like(scores)

    def keep(first, stop, part):
        out[first:stop] = part

    forward.stream(len(images), lambda first, stop: ablated[first:stop], keep, from_layer=True)
    assert not np.allclose(out, scores)  # the ablation changed the scores: the check is not vacuous
    np.testing.assert_allclose(out, expected, atol=tolerance * np.abs(expected).max())


def test_from_layer_refuses_a_blob_a_later_layer_bypasses(tmp_path):
    net = make_net(tmp_path, NETS["resnet_block_bn_scale_eltwise"][0])
    forward = Forward(net, score="fc", layer="branch_a")
    values = np.zeros((1, *forward.layer_shape), np.float32)
    with pytest.raises(ValueError, match="layer 'sum' above layer blob 'branch_a' also reads blob 'conv1"):
        forward.stream(1, lambda first, stop: values, lambda *a: None, from_layer=True)


def test_overflowing_rows_are_named(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 4)
    images[3] = 3e38
    with pytest.raises(ValueError, match=r"images\[3\] overflows float32"):
        Forward(net, score="fc", batch_size=2).scores(images)


def test_softmax_matches_caffe(tmp_path, rng):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 3)
    pycaffe_forward(net, images, "fc")
    np.testing.assert_allclose(softmax(net.blobs["fc"].data), net.blobs["prob"].data, rtol=1e-6)
