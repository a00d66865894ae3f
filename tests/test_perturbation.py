"""The perturbation methods (occlusion, RISE, Score-CAM, Ablation-CAM) against references written from
their definitions: one pycaffe forward per perturbed copy, NumPy for the rest, SciPy and scikit-image
for the resampling (not fastsal's own)."""

import numpy as np
import pytest
import zarr
from scipy import ndimage
from skimage.transform import resize

import fastsal
from conftest import NETS, assert_close_to_reference, make_net, producer_layer, random_images
from fastsal._forward import Forward
from fastsal._perturbation import rise_masks


def pycaffe_scores(net, batch, score):
    net.blobs["data"].reshape(*batch.shape)
    net.reshape()
    net.blobs["data"].data[...] = batch
    net.forward()
    return net.blobs[score].data.reshape(len(batch), -1).copy()


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def starts(size, window, stride):
    """Captum's window starts along one axis: every stride while the window fits, plus one cut at the edge."""
    first = list(range(0, size - window + 1, stride))
    return first + ([first[-1] + stride] if first[-1] + window < size else [])


def occlusion_reference(net, score, images, classes, window, stride, baseline):
    n, (c_all, h, w) = len(images), images.shape[1:]
    total = np.zeros((n, classes.shape[1], c_all, h, w))
    count = np.zeros((c_all, h, w))
    clean = pycaffe_scores(net, images, score)
    for c in starts(c_all, window[0], stride[0]):
        for y in starts(h, window[1], stride[1]):
            for x in starts(w, window[2], stride[2]):
                part = np.s_[c : c + window[0], y : y + window[1], x : x + window[2]]
                occluded = images.copy()
                occluded[(slice(None), *part)] = baseline
                drop = clean - pycaffe_scores(net, occluded, score)
                for i in range(n):
                    total[(i, slice(None), *part)] += drop[i, classes[i]][:, None, None, None]
                count[part] += 1
    return total / count


@pytest.fixture
def case(small_net, rng):
    net, _, score = small_net
    images = random_images(rng, net, 3)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(3, 2))
    return net, score, images, classes


@pytest.mark.parametrize(("window", "stride"), [((3, 3), 2), ((1, 4, 5), (1, 3, 2))], ids=["hw", "chw"])
def test_occlusion_is_captums_definition(case, window, stride):
    net, score, images, classes = case
    options = {"sliding_window_shapes": window, "strides": stride, "baselines": 0.25}
    got = fastsal.attribute(net, images, classes, "occlusion", score=score, reduce="none", **options)
    channels = images.shape[1]
    full_window = window if len(window) == 3 else (channels, *window)
    full_stride = stride if isinstance(stride, tuple) else (channels, stride, stride)
    expected = occlusion_reference(net, score, images, classes, full_window, full_stride, 0.25)
    assert_close_to_reference(got, expected)
    mean = fastsal.attribute(net, images, classes, "occlusion", score=score, **options)
    assert_close_to_reference(mean, expected.mean(axis=2))


def rise_reference(net, score, images, classes, masks, p1):
    out = np.zeros((len(images), classes.shape[1], *images.shape[2:]))
    for i, image in enumerate(images):
        probabilities = softmax(pycaffe_scores(net, image[None] * masks[:, None], score).astype(np.float64))
        for k, c in enumerate(classes[i]):
            out[i, k] = np.tensordot(probabilities[:, c], masks, axes=1)
    return out / (len(masks) * p1)


def test_rise_is_the_papers_estimator_on_the_same_masks(case):
    net, score, images, classes = case
    masks = rise_masks(0, 300, images.shape[2:], 4, 0.5, seed=7)
    got = fastsal.attribute(net, images, classes, "rise", score=score, n_masks=300, grid_size=4, seed=7)
    assert_close_to_reference(got, rise_reference(net, score, images, classes, masks, 0.5))


def test_rise_masks_follow_the_paper(rng):
    masks = rise_masks(0, 400, (20, 28), 5, 0.3, seed=3)
    assert masks.shape == (400, 20, 28) and masks.min() >= 0 and masks.max() <= 1
    assert abs(masks.mean() - 0.3) < 0.03  # cells kept with probability p1, bilinear in between
    np.testing.assert_array_equal(rise_masks(10, 5, (20, 28), 5, 0.3, seed=3), masks[10:15])
    assert not np.array_equal(rise_masks(0, 5, (20, 28), 5, 0.3, seed=4), masks[:5])


def test_rise_with_fewer_masks_than_a_batch_has_rows(case):
    """A batch of 16 rows over 2 masks wraps around them several times (it raised a broadcast error)."""
    net, score, images, classes = case
    masks = rise_masks(0, 2, images.shape[2:], 3, 0.5, seed=5)
    got = fastsal.attribute(net, images, classes, "rise", score=score, n_masks=2, grid_size=3, seed=5)
    assert_close_to_reference(got, rise_reference(net, score, images, classes, masks, 0.5))


def test_rise_seed_makes_maps_reproducible_whatever_the_batch(case):
    net, score, images, classes = case
    one = fastsal.attribute(
        net, images, classes, "rise", score=score, n_masks=50, grid_size=3, seed=1, batch_size=3
    )
    other = fastsal.Attribution(net, "rise", score=score, n_masks=50, grid_size=3, seed=1, batch_size=16)
    np.testing.assert_allclose(other.compute(images, classes), one, rtol=1e-5)


def cam_reference(weights, activations, size, normalize=True):
    """ReLU of the weighted channels, upsampled (half-pixel bilinear, scikit-image), scaled to [0, 1]."""
    cams = np.maximum(np.einsum("kc,chw->khw", weights, activations), 0)
    up = np.stack([resize(cam, size, order=1, mode="edge", anti_aliasing=False) for cam in cams])
    if not normalize:
        return up
    up = up - up.min(axis=(1, 2), keepdims=True)
    return up / (1e-7 + up.max(axis=(1, 2), keepdims=True))


def assert_cams_close(got, expected):
    """Per image: close to the reference, or both all zeros (every weighted sum negative: ReLU)."""
    if not np.abs(expected).max():
        np.testing.assert_array_equal(got, 0)
        return 0
    assert_close_to_reference(got, expected, rtol=1e-4)
    return 1


def layer_values(net, score, images, layer):
    pycaffe_scores(net, images, score)
    return net.blobs[layer].data.copy()


def scorecam_reference(net, score, images, classes, layer):
    """One pycaffe forward per (image, channel): masks zoomed by SciPy, scaled to [0, 1]."""
    acts = layer_values(net, score, images, layer)
    size = images.shape[2:]
    references = []
    for i, image in enumerate(images):
        zoom = (size[0] / acts.shape[2], size[1] / acts.shape[3])
        masks = np.stack(
            [ndimage.zoom(a.astype(np.float64), zoom, order=1, grid_mode=False) for a in acts[i]]
        )
        masks = (masks - masks.min(axis=(1, 2), keepdims=True)) / (
            np.ptp(masks, axis=(1, 2), keepdims=True) + 1e-8
        )
        scores = pycaffe_scores(net, (image[None] * masks[:, None]).astype(np.float32), score)
        weights = softmax(scores[:, classes[i]].T.astype(np.float64))
        references.append(cam_reference(weights, acts[i], size))
    return references


def test_scorecam_is_its_definition(case):
    net, score, images, classes = case
    layer = fastsal.Attribution(net, "scorecam", score=score).layer
    got = fastsal.attribute(net, images, classes, "scorecam", score=score)
    checked = 0
    for i, expected in enumerate(scorecam_reference(net, score, images, classes, layer)):
        checked += assert_cams_close(got[i], expected)
    assert checked, "every reference map was zero: the check would be vacuous"


def test_scorecam_runs_one_forward_per_distinct_channel(tmp_path, rng, monkeypatch):
    """Channels with the same values (a twin filter; two filters a ReLU zeroes everywhere) make the same
    masked image: one forward serves each group, and the maps are still the definition's."""
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    weights, bias = net.params["conv2"][0].data, net.params["conv2"][1].data
    weights[1], bias[1] = weights[0], bias[0]
    weights[2:4], bias[2:4] = 0, -1  # all-zero after relu2, for every image
    images = random_images(rng, net, 3)
    classes = rng.integers(0, 7, size=(3, 2))
    streamed = []
    stream = Forward.stream
    monkeypatch.setattr(
        Forward,
        "stream",
        lambda self, count, *args, **kw: streamed.append(count) or stream(self, count, *args, **kw),
    )
    attribution = fastsal.Attribution(net, "scorecam", score="fc")
    assert attribution.layer == "pool2"
    got = attribution.compute(images, classes)
    acts = layer_values(net, "fc", images, "pool2").reshape(3, 8, -1)
    distinct = sum(len(np.unique(a, axis=0)) for a in acts)
    assert streamed == [distinct] and distinct <= 3 * (8 - 2)  # channels 0 and 1 alike, 2 and 3 alike
    for i, expected in enumerate(scorecam_reference(net, "fc", images, classes, "pool2")):
        assert_close_to_reference(got[i], expected, rtol=1e-4)


def test_ablationcam_is_its_definition(case):
    net, score, images, classes = case
    attribution = fastsal.Attribution(net, "ablationcam", score=score, normalize=False)
    layer = attribution.layer
    got = attribution.compute(images, classes)
    acts = layer_values(net, score, images, layer)
    clean = pycaffe_scores(net, images, score)
    names = list(net._layer_names)
    start = names[names.index(producer_layer(net, layer)) + 1]
    checked = 0
    for i in range(len(images)):
        fill = 0 if acts[i].min() == 0 else acts[i].min() - 1e7
        ablated = np.empty((acts.shape[1], clean.shape[1]), np.float32)
        for c in range(acts.shape[1]):
            pycaffe_scores(net, images[i : i + 1], score)
            net.blobs[layer].data[0, c] = fill
            net.forward(start=start)
            ablated[c] = net.blobs[score].data.reshape(-1)
        original = clean[i, classes[i]]
        weights = (original[:, None] - ablated[:, classes[i]].T) / original[:, None]
        checked += assert_cams_close(got[i], cam_reference(weights, acts[i], images.shape[2:], False))
    assert checked, "every reference map was zero: the check would be vacuous"


@pytest.mark.parametrize("method", ["occlusion", "rise", "scorecam", "ablationcam"])
def test_classes_share_the_forwards_and_match_one_at_a_time(tmp_path, rng, method):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = random_images(rng, net, 2)
    options = {
        "occlusion": {"sliding_window_shapes": (4, 4), "strides": 2},
        "rise": {"n_masks": 40, "seed": 2},
    }
    attribution = fastsal.Attribution(net, method, score="fc", **options.get(method, {}))
    both = attribution.compute(images, [3, 5])
    for k, c in enumerate([3, 5]):
        np.testing.assert_allclose(attribution.compute(images, c)[:, 0], both[:, k], rtol=1e-5, atol=1e-7)
    maps, top = attribution.compute_top_k(images, 2)
    clean = pycaffe_scores(net, images, "fc")
    np.testing.assert_array_equal(top, np.argsort(-clean, axis=1, kind="stable")[:, :2])


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("occlusion", {"sliding_window_shapes": (3, 3), "strides": 1}),
        ("rise", {"n_masks": 200, "grid_size": 3, "seed": 0}),
        ("scorecam", {}),
        ("ablationcam", {}),
    ],
)
def test_inexact_forward_ranks_alike(tmp_path, rng, method, options):
    """exact=False: oneDNN's convolutions, in bf16 on CPUs with AMX (build_info()["perturbation_forward"]),
    ReLUs fused. The maps agree with the exact ones in rank, and nearly everywhere within 2e-2 of the max."""
    from conftest import spearman

    net = make_net(tmp_path, NETS["resnet_block_bn_scale_eltwise"][0])
    images = random_images(rng, net, 2)
    exact = fastsal.attribute(net, images, [1, 3], method, score="fc", **options)
    fast = fastsal.attribute(net, images, [1, 3], method, score="fc", exact=False, **options)
    for n in range(2):
        for k in range(2):
            assert spearman(exact[n, k], fast[n, k]) > 0.99
            close = np.abs(fast[n, k] - exact[n, k]) <= 2e-2 * np.abs(exact[n, k]).max()
            assert close.mean() >= 0.99


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        ("occlusion", {"sliding_window_shapes": (30, 3)}, ValueError, "within the image's"),
        (
            "occlusion",
            {"sliding_window_shapes": (3, 3), "strides": 4},
            ValueError,
            "must not exceed the window",
        ),
        ("occlusion", {"strides": 0, "sliding_window_shapes": (3, 3)}, ValueError, "strides must be"),
        (
            "occlusion",
            {"reduce": "max", "sliding_window_shapes": (3, 3)},
            ValueError,
            "reduce must be one of mean",
        ),
        ("rise", {"p1": 0}, ValueError, r"p1 \(the probability of keeping a cell\) must be in \(0, 1\]"),
        ("rise", {"n_masks": 0}, ValueError, "n_masks"),
        ("rise", {"seed": -1}, ValueError, "seed must be"),
        ("scorecam", {"normalize": 1}, TypeError, "normalize must be True or False"),
        ("scorecam", {"layer": "fc"}, ValueError, "fc"),
        ("ablationcam", {"layer": "data"}, ValueError, "input blob itself; Ablation-CAM needs"),
        ("ablationcam", {"samples": 3}, TypeError, "takes no option 'samples'"),
    ],
)
def test_bad_options_are_refused(tmp_path, method, options, error, match):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    with pytest.raises(error, match=match):
        fastsal.Attribution(net, method, score="fc", **options)


def test_cams_refuse_undefined_maps(tmp_path, rng):
    """A one-pixel layer gave striped rounding noise (Score-CAM); a class score of exactly 0 gave NaN
    maps (Ablation-CAM's weights divide by it). Both are refused, naming what is wrong."""
    net = make_net(tmp_path, NETS["resnet_block_bn_scale_eltwise"][0])
    with pytest.raises(
        ValueError, match="'pool' has one pixel per channel: Score-CAM's maps would be constant"
    ):
        fastsal.Attribution(net, "scorecam", score="fc", layer="pool")
    net.params["fc"][0].data[...] = 0
    net.params["fc"][1].data[...] = 0
    images = random_images(rng, net, 2)
    with pytest.raises(ValueError, match=r"images\[0\] scores exactly 0 for class 1: Ablation-CAM's weights"):
        fastsal.attribute(net, images, 1, "ablationcam", score="fc")


def test_ablationcam_refuses_a_layer_a_residual_bypasses(tmp_path):
    net = make_net(tmp_path, NETS["resnet_block_bn_scale_eltwise"][0])
    with pytest.raises(ValueError, match="layer 'sum' above layer blob 'branch_a' also reads blob 'conv1"):
        fastsal.Attribution(net, "ablationcam", score="fc", layer="branch_a")
    assert fastsal.Attribution(net, "scorecam", score="fc", layer="branch_a").layer == "branch_a"


def test_run_jobs_with_perturbation_methods(model, tmp_path, rng):
    """`fastsal run --method rise` draws its masks' seed once per store: any chunk size gives the API's maps."""
    from fastsal import cli

    prototxt, weights = model
    inputs = rng.standard_normal((5, 3, 32, 32)).astype(np.float32) * 40
    np.save(tmp_path / "inputs.npy", inputs)
    net = fastsal.load(prototxt, weights)
    common = ["run", str(tmp_path / "inputs.npy"), "--model-def", prototxt, "--pretrained-model", weights]
    assert (
        cli.main(
            [*common, "-o", str(tmp_path / "occ.zarr"), "--method", "occlusion", "--window", "8,8"]
            + ["--stride", "4", "--classes", "1,3", "--quiet"]
        )
        == 0
    )
    occlusion = [*common, "-o", str(tmp_path / "occ.zarr"), "--method", "occlusion", "--window", "8,8"]
    assert (
        cli.main([*occlusion, "--stride", "4", "--classes", "1,3", "--quiet"]) == 0
    )  # a tuple option resumes
    expected = fastsal.attribute(net, inputs, [1, 3], "occlusion", sliding_window_shapes=(8, 8), strides=4)
    np.testing.assert_allclose(
        zarr.open_group(str(tmp_path / "occ.zarr"))["maps"][:], expected, rtol=1e-5, atol=1e-6
    )
    for chunk in (2, 5):
        out = str(tmp_path / f"rise{chunk}.zarr")
        rise = ["--method", "rise", "--n-masks", "30", "--grid-size", "4", "--top-k", "2", "--quiet"]
        assert cli.main([*common, "-o", out, "--chunk-size", str(chunk), *rise]) == 0
    one, other = (zarr.open_group(str(tmp_path / f"rise{c}.zarr")) for c in (2, 5))
    seed = one.attrs["fastsal"]["plan"]["options"]["seed"]
    assert isinstance(seed, int)
    other_seed = other.attrs["fastsal"]["plan"]["options"]["seed"]
    redone = fastsal.attribute(net, inputs, one["classes"][:], "rise", n_masks=30, grid_size=4, seed=seed)
    np.testing.assert_allclose(one["maps"][:], redone, rtol=1e-4, atol=1e-7)
    assert other_seed != seed or np.allclose(other["maps"][:], one["maps"][:], rtol=1e-4)
