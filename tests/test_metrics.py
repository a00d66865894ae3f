"""fastsal.metrics against references written from the papers: RISE's deletion and insertion games as a
slow pycaffe loop (one net.forward per perturbed image), on the small nets with seeded weights."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal

import fastsal
from conftest import NETS, make_net, producer_layer, random_images

TOL = 1e-4


def probabilities(net, score, image) -> np.ndarray:
    """The class probabilities of one image through pycaffe: softmax of the score blob, in float64."""
    net.blobs["data"].reshape(1, *image.shape)
    out = net.forward(data=image[None], end=producer_layer(net, score))[score].reshape(-1).astype(np.float64)
    e = np.exp(out - out.max())
    return e / e.sum()


def rise_blur(image, klen=11, sigma=5.0):
    """RISE's substrate: gkern (a delta smoothed by gaussian_filter), each channel convolved with zero fill."""
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    kernel = scipy.ndimage.gaussian_filter(delta, sigma)
    return np.stack(
        [scipy.signal.convolve2d(c, kernel, mode="same", boundary="fill", fillvalue=0) for c in image]
    ).astype(np.float32)


def causal_reference(net, score, images, classes, maps, mode, step, baseline=0.0):
    """RISE's CausalMetric from the paper, one image at a time: pixels in decreasing order of the map
    (ties: the lower flat index first), step at a time, moved from start to finish; the class
    probability before each step and after the last; the trapezoid area over [0, 1]."""
    n, c, h, w = images.shape
    hw = h * w
    n_steps = (hw + step - 1) // step
    curves = np.empty((*classes.shape, n_steps + 1))
    for i, image in enumerate(images):
        for k, label in enumerate(classes[i]):
            order = np.argsort(-maps[i, k].reshape(-1), kind="stable")
            if mode == "deletion":
                current, finish = image.copy(), np.broadcast_to(np.float32(baseline), image.shape)
            else:
                current, finish = rise_blur(image), image
            for s in range(n_steps + 1):
                curves[i, k, s] = probabilities(net, score, current)[label]
                coords = order[step * s : step * (s + 1)]
                current.reshape(c, hw)[:, coords] = finish.reshape(c, hw)[:, coords]
    auc = (curves.sum(-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (curves.shape[-1] - 1)
    return auc, curves


@pytest.fixture
def case(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 3)
    classes = rng.integers(0, net.blobs[score].data[0].size, size=(3, 2))
    maps = rng.standard_normal((3, 2, *images.shape[2:])).astype(np.float32)
    return net, score, images, classes, maps


@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
def test_deletion_and_insertion_match_the_rise_reference(case, tied):
    net, score, images, classes, maps = case
    if tied:  # a few levels only: the ranking's tie rule decides which pixels go first
        maps = np.round(maps)
    step = 7  # does not divide H * W: the last step moves fewer pixels
    got = fastsal.evaluate(
        net,
        images,
        classes,
        [fastsal.metrics.Deletion(step=step, baseline=0.5), fastsal.metrics.Insertion(step=step)],
        maps=maps,
        score=score,
        batch_size=5,  # batches straddle pairs and the two metrics
    )
    for mode, baseline in (("deletion", 0.5), ("insertion", None)):
        auc, curves = causal_reference(net, score, images, classes, maps, mode, step, baseline)
        np.testing.assert_allclose(got[f"{mode}_curve"], curves, atol=TOL)
        np.testing.assert_allclose(got[mode], auc, atol=TOL)
    assert got["deletion_curve"].shape[-1] == -(-images.shape[2] * images.shape[3] // step) + 1


def test_deletion_of_a_method_s_maps_and_the_default_step(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0], [1]])
    got = fastsal.evaluate(
        net, images, classes, "deletion", method="smoothgrad", samples=3, seed=4, score=score
    )
    maps = fastsal.attribute(net, images, classes, "smoothgrad", samples=3, seed=4, score=score)
    auc, curves = causal_reference(net, score, images, classes, maps, "deletion", images.shape[-1])
    np.testing.assert_allclose(got["deletion_curve"], curves, atol=TOL)
    np.testing.assert_allclose(got["deletion"], auc, atol=TOL)
    assert set(got) == {"deletion", "deletion_curve"}


def test_integrated_gradients_convergence_delta_is_relative(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0, 1], [2, 0]])
    got = fastsal.evaluate(
        net,
        images,
        classes,
        "insertion",
        method="integrated_gradients",
        n_steps=8,
        convergence_delta=True,
        score=score,
    )
    _, delta = fastsal.attribute(
        net, images, classes, "integrated_gradients", n_steps=8, score=score, return_convergence_delta=True
    )
    reference = []
    for i, image in enumerate(images):
        net.blobs["data"].reshape(1, *image.shape)
        end = producer_layer(net, score)
        fx = net.forward(data=image[None], end=end)[score].reshape(-1).astype(np.float64)
        fb = net.forward(data=np.zeros_like(image)[None], end=end)[score].reshape(-1).astype(np.float64)
        reference.append(np.abs(delta[i]) / np.abs(fx[classes[i]] - fb[classes[i]]))
    np.testing.assert_allclose(got["convergence_delta"], np.array(reference), rtol=1e-4, atol=1e-6)


def test_refusals(case):
    net, score, images, classes, maps = case
    with pytest.raises(ValueError, match="unknown metric 'delete'"):
        fastsal.evaluate(net, images, classes, "delete", maps=maps, score=score)
    with pytest.raises(ValueError, match="maps must be"):
        fastsal.evaluate(net, images, classes, "deletion", maps=maps[:, :1], score=score)
    with pytest.raises(ValueError, match="NaN"):
        fastsal.evaluate(net, images, classes, "deletion", maps=np.full_like(maps, np.nan), score=score)
    with pytest.raises(TypeError, match="a method's"):
        fastsal.evaluate(net, images, classes, "deletion", maps=maps, score=score, samples=3)
    with pytest.raises(ValueError, match="step must be at least 1"):
        fastsal.metrics.Deletion(step=0)
    with pytest.raises(ValueError, match="baseline must be"):
        fastsal.evaluate(
            net, images, classes, fastsal.metrics.Deletion(baseline=np.zeros(3)), maps=maps, score=score
        )
    with pytest.raises(ValueError, match="once"):
        fastsal.evaluate(net, images, classes, ["deletion", "deletion"], maps=maps, score=score)
    with pytest.raises(TypeError, match=r"fastsal.metrics.MPRT\(similarities=...\)"):
        fastsal.evaluate(net, images, classes, ["deletion", "mprt"], score=score, similarities=["ssim"])
    with pytest.raises(TypeError, match=r"fastsal.metrics.Deletion\(step=...\)"):
        fastsal.evaluate(net, images, classes, "deletion", maps=maps, score=score, step=4)


def test_odd_but_valid_metric_settings(case):
    """A step beyond the image's pixels deletes everything at once, as a step of H * W (no int64
    overflow mid-evaluation); one number is one ROAD percentage; a baseline that is no array of
    numbers is named as such."""
    net, score, images, classes, maps = case
    pixels = images.shape[2] * images.shape[3]
    huge, exact = (
        fastsal.evaluate(net, images, classes, fastsal.metrics.Deletion(step=step), maps=maps, score=score)
        for step in (10**30, pixels)
    )
    assert huge["deletion_curve"].shape[-1] == 2
    for key in exact:
        np.testing.assert_array_equal(huge[key], exact[key], err_msg=key)
    assert fastsal.metrics.RoadMoRF(percentages=50).percentages == [50]
    with pytest.raises(TypeError, match="baseline must be a number or an array of numbers"):
        fastsal.metrics.Deletion(baseline={"a": 1})


def test_layer_sized_maps_are_refused(tmp_path, rng):
    from conftest import NETS, make_net

    text, score = NETS["conv_maxpool_fc_softmax"]  # Grad-CAM's layer: pool2, 3 x 3
    net = make_net(tmp_path, text)
    images = random_images(rng, net, 2)
    with pytest.raises(ValueError, match="input's size"):
        fastsal.evaluate(net, images, 0, "deletion", method="gradcam", upsample=False, score=score)


# ---- ROAD: the imputation against Quantus 0.6.0's noisy_linear_imputation, the curves through pycaffe ----


def documented_noise(road, image, column, index, shape):
    """fastsal's documented ROAD noise, drawn here from its definition rather than through fastsal."""
    return road.noise * np.random.default_rng([road.seed, image, column, index]).standard_normal(shape)


def quantus_imputation(monkeypatch, image, indices, noise):
    """Quantus's noisy_linear_imputation of one image, its np.random.randn replaced by the given noise
    (Quantus draws from NumPy's global state; fastsal draws per image, class and percentage)."""
    perturb = pytest.importorskip("quantus.functions.perturb_func")
    monkeypatch.setattr(np.random, "randn", lambda *shape: noise.reshape(shape))
    return perturb.noisy_linear_imputation(arr=image, indices=indices, noise=1.0)


@pytest.mark.parametrize("road_class", ["RoadMoRF", "RoadLeRF"])
def test_road_matches_quantus_imputation_through_pycaffe(case, monkeypatch, road_class):
    net, score, images, classes, maps = case
    road = getattr(fastsal.metrics, road_class)(percentages=[0, 10, 55, 99], noise=0.05, seed=7)
    got = fastsal.evaluate(net, images, classes, road, maps=maps, score=score, batch_size=3)
    hw = maps.shape[-2] * maps.shape[-1]
    curves = np.empty(got[f"{road.name}_curve"].shape)
    for i, image in enumerate(images):
        for k, label in enumerate(classes[i]):
            flat = maps[i, k].reshape(-1)
            order = np.argsort(-flat if road_class == "RoadMoRF" else flat, kind="stable")
            for j, p in enumerate(road.percentages):
                indices = order[: int(hw * p / 100)]
                perturbed = image
                if len(indices):
                    noise = documented_noise(road, i, k, j, (image.shape[0], len(indices)))
                    perturbed = quantus_imputation(monkeypatch, image, indices, noise).astype(np.float32)
                curves[i, k, j] = probabilities(net, score, perturbed)[label]
    np.testing.assert_allclose(got[f"{road.name}_curve"], curves, atol=TOL)
    np.testing.assert_allclose(got[road.name], curves.mean(axis=2), atol=TOL)


def test_road_accuracy_matches_quantus_road(tmp_path, rng, monkeypatch):
    """Quantus 0.6.0's ROAD itself, on the same weights through fastsal.torch_port: its per-image
    accuracy at each percentage. Quantus ranks the map broadcast to the image's shape but imputes by
    pixel, so it runs on one-channel images only (three channels: an IndexError in Quantus)."""
    torch = pytest.importorskip("torch")
    quantus = pytest.importorskip("quantus")
    from conftest import _input, conv, fc, layer, make_net
    from fastsal.torch_port import to_torch

    text = (
        _input((1, 10, 10))
        + conv("conv1", "data", 6)
        + layer("relu1", "ReLU", "conv1", "conv1")
        + layer("pool1", "Pooling", "conv1", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        + fc("fc", "pool1", 4)
        + layer("prob", "Softmax", "fc")
    )
    net = make_net(tmp_path, text, seed=3)
    model = to_torch(net, str(tmp_path / "net.prototxt"), "fc").eval()
    images = rng.standard_normal((6, 1, 10, 10)).astype(np.float32)
    labels = model(torch.from_numpy(images)).argmax(1).numpy()
    maps = rng.standard_normal((6, 1, 10, 10)).astype(np.float32)
    road = fastsal.metrics.RoadMoRF(percentages=[10, 30, 50, 70, 90], noise=0.5, seed=2, output="accuracy")
    got = fastsal.evaluate(net, images, labels[:, None], road, maps=maps[:, 0, None], score="fc")
    draws = iter(
        documented_noise(road, i, 0, j, (1, int(100 * p / 100)))
        for j, p in enumerate(road.percentages)  # Quantus: percentages outside, images inside
        for i in range(len(images))
    )
    monkeypatch.setattr(np.random, "randn", lambda *shape: next(draws).reshape(shape) / road.noise)
    metric = quantus.ROAD(
        percentages=road.percentages, noise=road.noise, normalise=False, abs=False, disable_warnings=True
    )
    wrapped = quantus.helpers.utils.get_wrapped_model(model, channel_first=True, softmax=True, device="cpu")
    metric.a_size = 100
    (expected,) = metric.evaluate_batch(model=wrapped, x_batch=images, y_batch=labels, a_batch=maps)
    np.testing.assert_array_equal(got["road_morf_curve"][:, 0], expected)
    assert 0 < got["road_morf_curve"].mean() < 1  # some predictions change: the check has teeth


def test_linear_imputation_matches_quantus_and_a_general_sparse_solve(rng, monkeypatch):
    """The nested-dissection factorisation gives the values of Quantus's noisy_linear_imputation (noise
    0) and of scipy's general spsolve on the same system, written here from the docstring's equations,
    to float64 rounding, on a non-square multi-channel image at low and high percentages."""
    import scipy.sparse
    import scipy.sparse.linalg

    c, h, w = 3, 37, 52
    image = rng.standard_normal((c, h, w)).astype(np.float32)
    order = fastsal.metrics.ranking(scipy.ndimage.gaussian_filter(rng.standard_normal((h, w)), 2))
    places = fastsal.metrics.dissection_places(h, w)
    np.testing.assert_array_equal(np.sort(places), np.arange(h * w))  # a permutation of the pixels
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for p in (1, 20, 50, 90, 99.9):
        removed = order[: int(h * w * p / 100)]
        got = fastsal.metrics.linear_imputation(image, removed)
        index = {int(pixel): u for u, pixel in enumerate(removed)}
        matrix = scipy.sparse.lil_matrix((len(removed), len(removed)))
        rhs = np.zeros((len(removed), c))
        for u, pixel in enumerate(removed):
            y, x = divmod(int(pixel), w)
            for dy, dx in offsets:
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    weight = 1 / 6 if dy == 0 or dx == 0 else 1 / 12
                    matrix[u, u] += weight
                    neighbour = (y + dy) * w + x + dx
                    if neighbour in index:
                        matrix[u, index[neighbour]] -= weight
                    else:
                        rhs[u] += weight * image[:, y + dy, x + dx].astype(np.float64)
        expected = scipy.sparse.linalg.spsolve(matrix.tocsc(), rhs).reshape(len(removed), c).T
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        if importlib.util.find_spec("quantus"):  # Quantus returns the image's float32
            quantus = quantus_imputation(monkeypatch, image, removed, np.zeros((c, len(removed))))
            np.testing.assert_allclose(got, quantus.reshape(c, -1)[:, removed], rtol=0, atol=1e-5)
    # Every pixel removed: a singular system with a zero right-hand side; 0 everywhere, as spsolve gave.
    np.testing.assert_array_equal(fastsal.metrics.linear_imputation(image, order), np.zeros((c, h * w)))


# ---- MPRT: the randomised nets built by hand from the documented scheme, the similarities from scipy/skimage ----


def test_rank_correlation_is_scipy_spearman_on_every_row(rng):
    """The rows at once (MPRT's per-step similarity) against scipy's spearmanr one pair at a time,
    with ties and constant rows (NaN, as before)."""
    from scipy.stats import spearmanr

    a = np.round(rng.standard_normal((3, 4, 50)), 1)  # ties
    b = rng.standard_normal((3, 4, 50))
    a[1, 2] = 7.0  # constant: NaN
    got = fastsal.metrics.rank_correlation(fastsal.metrics.ranks(a), fastsal.metrics.ranks(b))
    for i in range(3):
        for j in range(4):
            expected = np.nan if (i, j) == (1, 2) else spearmanr(a[i, j], b[i, j]).statistic
            np.testing.assert_allclose(got[i, j], expected, rtol=0, atol=1e-12)
            np.testing.assert_allclose(fastsal.metrics.spearman(a[i, j], b[i, j]), expected, atol=1e-12)


def randomise_in_place(net, seed):
    """Every parameter blob of net re-drawn in place, as MPRT re-draws its copy's layers."""
    for name, blobs in net.params.items():
        for blob, values in zip(blobs, fastsal.metrics.random_weights(net, name, seed)):
            blob.data[...] = values


@pytest.mark.parametrize(
    "method, options",
    [
        ("saliency", {}),
        ("saliency", {"exact": False}),  # oneDNN's forward: BatchNorm folded, weights reordered
        ("lrp", {}),  # modified weights built once per engine
        ("lrp", {"composite": "epsilon_gamma_box", "low": -3.0, "high": 3.0}),
        ("lrp", {"exact": False}),  # the rule convolutions' own oneDNN forward holds a copy of the weights
        ("gradcam", {}),
    ],
    ids=["saliency", "inexact", "lrp", "lrp_gamma_box", "lrp_inexact", "gradcam"],
)
def test_a_reloaded_engine_gives_a_fresh_engine_s_maps(small_net, rng, method, options):
    """MPRT's one engine per run: after the net's weights are re-drawn in place and reload_weights(),
    the maps are those of an Attribution built afresh on the randomised net, bit for bit."""
    net, _, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0], [1]])
    copy = fastsal.metrics.net_copy(net)
    try:
        attribution = fastsal.Attribution(copy, method, score=score, **options)
    except ValueError as error:  # an LRP composite this net's layers cannot take, Grad-CAM without a 4-D blob
        pytest.skip(str(error))
    before = attribution.compute(images, classes)  # every cache built from the trained weights
    randomise_in_place(copy, seed=5)
    attribution.reload_weights()
    reloaded = attribution.compute(images, classes)
    fresh = fastsal.Attribution(copy, method, score=score, **options).compute(images, classes)
    assert np.abs(fresh - before).max() > 1e-3 * np.abs(before).max()  # the weights did change the maps
    np.testing.assert_array_equal(reloaded, fresh)


def test_mprt_copy_of_the_net_does_not_log_caffe_s_setup(small_net, capfd):
    """MPRT's private copy of the net is built without Caffe's per-layer INFO lines (dozens of lines per
    layer on the user's terminal), at the user's own log level, which is restored afterwards."""
    net, _, _ = small_net
    fastsal.set_caffe_log_level(0)
    try:
        capfd.readouterr()
        fastsal.metrics.net_copy(net)
        logged = capfd.readouterr().err
        assert fastsal._core.log_level() == 0
    finally:
        fastsal.set_caffe_log_level(1)  # conftest's level
    assert "Setting up" not in logged and "Initializing net" not in logged


@pytest.mark.parametrize("method", ["saliency", "lrp", "deeplift"])
def test_attribute_follows_weights_written_in_place(tmp_path, rng, method):
    """fastsal.attribute's cached engine after the user writes the net's weights in place (as
    net.copy_from does): the maps of an Attribution built afresh, bit for bit (LRP's cached engine kept
    the modified weights of the old ones)."""
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0], seed=2)
    images = random_images(rng, net, 2)
    before = fastsal.attribute(net, images, [0, 1], method)
    randomise_in_place(net, seed=5)
    after = fastsal.attribute(net, images, [0, 1], method)
    fresh = fastsal.Attribution(net, method).compute(images, [0, 1])
    assert np.abs(fresh - before).max() > 1e-3 * np.abs(before).max()  # the weights did change the maps
    np.testing.assert_array_equal(after, fresh)


def randomised_by_hand(net, path, layers, seed, cascading_upto):
    """A fresh pycaffe net from the prototxt with the trained weights, the given layers re-drawn as
    fastsal.metrics.random_weights documents it (written here from that text)."""
    import caffe

    copy = caffe.Net(path, caffe.TEST)
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            copy.params[name][i].data[...] = blob.data
    names = list(net.params)
    for name in layers[:cascading_upto]:
        kind = net.layers[list(net._layer_names).index(name)].type
        rng = np.random.default_rng([seed, names.index(name)])
        for i, blob in enumerate(net.params[name]):
            if kind == "BatchNorm":
                copy.params[name][i].data[...] = 0.0 if i == 0 else 1.0
            elif kind == "Scale":
                copy.params[name][i].data[...] = 1.0 if i == 0 else 0.0
            else:
                copy.params[name][i].data[...] = rng.normal(0.0, float(blob.data.std()), blob.data.shape)
    return copy


def test_mprt_cascading_matches_hand_randomised_nets(small_net, rng):
    from scipy.stats import spearmanr
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    net, path, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0, 1], [2, 0]])
    trained = {name: [np.copy(b.data) for b in blobs] for name, blobs in net.params.items()}
    got = fastsal.evaluate(net, images, classes, fastsal.metrics.MPRT(seed=5), method="saliency", score=score)
    for name, blobs in net.params.items():  # the user's weights never change
        for blob, before in zip(blobs, trained[name]):
            np.testing.assert_array_equal(blob.data, before)
    layers = list(net.params)[::-1]
    assert list(got["mprt_layers"]) == layers
    original = fastsal.attribute(net, images, classes, "saliency", score=score)
    for t in range(len(layers)):
        copy = randomised_by_hand(net, path, layers, 5, t + 1)
        maps = fastsal.attribute(copy, images, classes, "saliency", score=score)
        for i in range(2):
            for k in range(2):
                a, b = original[i, k], maps[i, k]
                expected = spearmanr(a.ravel(), b.ravel()).statistic
                np.testing.assert_allclose(got["mprt_spearman_abs"][i, k, t], expected, atol=TOL)
                na, nb = a / a.max(), b / b.max()
                window = min(7, *(d - 1 + d % 2 for d in a.shape))
                lo, hi = min(na.min(), nb.min()), max(na.max(), nb.max())
                expected = structural_similarity(na, nb, win_size=window, data_range=hi - lo)
                np.testing.assert_allclose(got["mprt_ssim"][i, k, t], expected, atol=TOL)
                cell = max(2, min(8, na.shape[0] // 4, na.shape[1] // 4))
                fa, fb = (
                    hog(m, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))
                    for m in (na, nb)
                )
                np.testing.assert_allclose(got["mprt_hog"][i, k, t], np.corrcoef(fa, fb)[0, 1], atol=TOL)
    np.testing.assert_array_equal(got["mprt"], got["mprt_spearman_abs"][..., -1])


def test_mprt_computes_the_similarities_asked_for(small_net, rng):
    net, _, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0], [1]])
    full = fastsal.evaluate(
        net, images, classes, fastsal.metrics.MPRT(seed=2), method="saliency", score=score
    )
    some = fastsal.evaluate(
        net,
        images,
        classes,
        fastsal.metrics.MPRT(seed=2, similarities=["hog", "spearman"]),
        method="saliency",
        score=score,
    )
    assert sorted(key for key in some if key.startswith("mprt_")) == [
        "mprt_hog",
        "mprt_layers",
        "mprt_spearman",
    ]
    for name in ("hog", "spearman"):
        np.testing.assert_array_equal(some[f"mprt_{name}"], full[f"mprt_{name}"])
    np.testing.assert_array_equal(some["mprt"], full["mprt_hog"][..., -1])  # the first one named
    for bad in (["pearson"], [], ["ssim", "ssim"], None, 3):
        with pytest.raises(ValueError, match="similarities must name"):
            fastsal.metrics.MPRT(similarities=bad)


def test_mprt_independent_and_final_only(small_net, rng):
    from scipy.stats import spearmanr

    net, path, score = small_net
    images = random_images(rng, net, 2)
    classes = np.array([[0], [1]])
    layers = list(net.params)[::-1]
    got = fastsal.evaluate(
        net,
        images,
        classes,
        fastsal.metrics.MPRT(order="independent", seed=1),
        method="input_x_gradient",
        score=score,
    )
    original = fastsal.attribute(net, images, classes, "input_x_gradient", score=score)
    for t, layer_name in enumerate(layers):
        copy = randomised_by_hand(net, path, [layer_name], 1, 1)
        maps = fastsal.attribute(copy, images, classes, "input_x_gradient", score=score)
        for i in range(2):
            expected = spearmanr(original[i, 0].ravel(), maps[i, 0].ravel()).statistic
            np.testing.assert_allclose(got["mprt_spearman_abs"][i, 0, t], expected, atol=TOL)
    np.testing.assert_allclose(got["mprt"], got["mprt_spearman_abs"].mean(axis=2))
    final = fastsal.evaluate(
        net,
        images,
        classes,
        fastsal.metrics.MPRT(final_only=True, seed=1),
        method="input_x_gradient",
        score=score,
    )
    full = fastsal.evaluate(
        net, images, classes, fastsal.metrics.MPRT(seed=1), method="input_x_gradient", score=score
    )
    np.testing.assert_array_equal(final["mprt_spearman_abs"][..., 0], full["mprt_spearman_abs"][..., -1])
    with pytest.raises(ValueError, match="recompute the maps"):
        fastsal.evaluate(net, images, classes, "mprt", maps=original, score=score)
    with pytest.raises(ValueError, match="layers must name"):
        fastsal.evaluate(net, images, classes, fastsal.metrics.MPRT(layers=["nope"]), score=score)
    last = list(net.params)[-1]  # one layer by name, as similarities= takes one (it was split into letters)
    np.testing.assert_array_equal(
        fastsal.evaluate(net, images, classes, fastsal.metrics.MPRT(layers=last, seed=1), score=score)[
            "mprt"
        ],
        fastsal.evaluate(net, images, classes, fastsal.metrics.MPRT(layers=[last], seed=1), score=score)[
            "mprt"
        ],
    )


def test_mprt_matches_quantus_on_the_same_randomised_weights(tmp_path, rng):
    """Quantus 0.6.0's MPRT (top_down) on the same weights through fastsal.torch_port, its explanations
    Captum's Saliency (max of |gradient| over channels, fastsal's "saliency"). Quantus re-draws a layer
    with torch's reset_parameters; here each module's reset loads fastsal's documented draws instead,
    so the comparison is of the tests, not of two random generators."""
    torch = pytest.importorskip("torch")
    quantus = pytest.importorskip("quantus")
    captum = pytest.importorskip("captum.attr")
    import types

    from conftest import NETS, make_net
    from fastsal.torch_port import to_torch

    text, score = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text, seed=8)
    model = to_torch(net, str(tmp_path / "net.prototxt"), score).eval()
    for name, module in model.named_modules():
        layer_name = name.split(".")[1] if name.count(".") else None
        if hasattr(module, "reset_parameters") and layer_name in net.params:

            def reset(self, layer_name=layer_name):  # bound: Quantus's deepcopy rebinds it to the copy
                weights = fastsal.metrics.random_weights(net, layer_name, 3)
                for parameter, values in zip(self.parameters(), weights):
                    parameter.data[...] = torch.from_numpy(values.reshape(parameter.shape))

            module.reset_parameters = types.MethodType(reset, module)
    images = random_images(rng, net, 4)
    labels = np.array([0, 3, 5, 6])

    def explain(model, inputs, targets, **kwargs):
        x = torch.from_numpy(np.asarray(inputs, np.float32)).requires_grad_()
        grads = captum.Saliency(model).attribute(x, target=torch.from_numpy(np.asarray(targets)), abs=True)
        return grads.detach().numpy().max(axis=1, keepdims=True)

    maps = fastsal.attribute(net, images, labels[:, None], "saliency", score=score)
    metric = quantus.MPRT(layer_order="top_down", seed=3, disable_warnings=True)
    expected = metric(
        model=model,
        x_batch=images,
        y_batch=labels,
        a_batch=maps[:, 0, None],
        explain_func=explain,
        channel_first=True,
        device="cpu",
    )
    got = fastsal.evaluate(
        net, images, labels[:, None], fastsal.metrics.MPRT(seed=3), method="saliency", score=score
    )
    layers = [name for name in expected if name != "original"]
    assert [name.split(".")[1] for name in layers] == list(got["mprt_layers"])
    quantus_scores = np.array([expected[name] for name in layers]).T  # (N, layers)
    np.testing.assert_allclose(got["mprt_spearman_abs"][:, 0], quantus_scores, atol=TOL)
    assert quantus_scores.min() < 0.9  # randomisation changed the maps: the check has teeth


# ---- infidelity and max-sensitivity against Captum's, fed fastsal's documented perturbations ----


@pytest.fixture
def translated_case(case, small_net):
    torch = pytest.importorskip("torch")
    pytest.importorskip("captum")
    from fastsal.torch_port import to_torch

    net, score, images, classes, _ = case
    torch.set_num_threads(2)
    return (*case[:4], to_torch(net, small_net[1], score))


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_infidelity_matches_captum(translated_case, rng, normalize):
    import torch
    from captum.metrics import infidelity

    net, score, images, classes, model = translated_case
    metric = fastsal.metrics.Infidelity(samples=4, stdev=0.1, seed=3, normalize=normalize)
    attributions = rng.standard_normal((*classes.shape, *images.shape[1:])).astype(np.float32)
    got = fastsal.evaluate(net, images, classes, metric, maps=attributions, score=score, batch_size=5)

    def perturb(inputs):  # Captum's rows: each image's samples in turn; the noise as fastsal documents it
        noise = np.stack(
            [
                0.1 * np.random.default_rng([3, i, s]).standard_normal(images.shape[1:])
                for i in range(len(images))
                for s in range(4)
            ]
        ).astype(np.float32)
        noise = torch.from_numpy(noise)
        return noise, inputs - noise

    expected = np.stack(
        [
            infidelity(
                model,
                perturb,
                torch.from_numpy(images),
                torch.from_numpy(attributions[:, k]),
                target=torch.from_numpy(classes[:, k]),
                n_perturb_samples=4,
                normalize=normalize,
            ).numpy()
            for k in range(classes.shape[1])
        ],
        axis=1,
    )
    np.testing.assert_allclose(got["infidelity"], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert np.abs(expected).max() > 0


def test_max_sensitivity_matches_captum(translated_case):
    import torch
    from captum.attr import Saliency
    from captum.metrics import sensitivity_max

    net, score, images, classes, model = translated_case
    metric = fastsal.metrics.MaxSensitivity(samples=3, radius=0.3, seed=2)
    got = fastsal.evaluate(net, images, classes, metric, method="saliency", reduce="none", score=score)

    def perturb(inputs, perturb_radius):
        delta = np.stack(
            [
                np.random.default_rng([2, i, s]).uniform(-0.3, 0.3, images.shape[1:])
                for i in range(len(images))
                for s in range(3)
            ]
        ).astype(np.float32)
        return inputs + torch.from_numpy(delta)

    saliency = Saliency(model)

    def explain(x, target):  # Captum hands over a tensor or a tuple of one, and wants a tuple back
        x = x[0] if isinstance(x, tuple) else x
        return (saliency.attribute(x.clone().requires_grad_(), target=target, abs=False),)

    expected = np.stack(
        [
            sensitivity_max(
                explain,
                torch.from_numpy(images),
                perturb_func=perturb,
                n_perturb_samples=3,
                target=torch.from_numpy(classes[:, k]),
            ).numpy()
            for k in range(classes.shape[1])
        ],
        axis=1,
    )
    np.testing.assert_allclose(got["max_sensitivity"], expected, rtol=1e-4, atol=1e-6)
    assert expected.max() > 0


# ---- the real model: open_nsfw on real photos (slow) ----


@pytest.fixture(scope="module")
def open_nsfw():
    from fastsal import examples

    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    images, _, _ = examples.open_nsfw_batch()
    return net, images[:2]


@pytest.mark.slow
def test_open_nsfw_deletion_and_insertion_match_the_rise_reference(open_nsfw):
    net, images = open_nsfw
    classes = np.array([[1], [0]])
    step = 224 * 56  # coarse: 5 points per curve
    got = fastsal.evaluate(
        net,
        images,
        classes,
        [fastsal.metrics.Deletion(step=step), fastsal.metrics.Insertion(step=step)],
        method="saliency",
    )
    maps = fastsal.compute(net, images, classes)
    for mode in ("deletion", "insertion"):
        auc, curves = causal_reference(net, "fc_nsfw", images, classes, maps, mode, step)
        np.testing.assert_allclose(got[f"{mode}_curve"], curves, atol=1e-3)  # probabilities: range 1
        np.testing.assert_allclose(got[mode], auc, atol=1e-3)


@pytest.mark.slow
def test_open_nsfw_cascading_randomisation_decorrelates_gradients_not_guided_backprop(open_nsfw):
    """Adebayo et al.'s finding: with every layer re-drawn, the gradient's and SmoothGrad's maps no
    longer rank pixels as before, while guided backprop's keep more of their structure."""
    net, images = open_nsfw
    before = {name: np.copy(blobs[0].data) for name, blobs in net.params.items()}
    similarity = {}
    for method, options in (
        ("saliency", {}),
        ("smoothgrad", {"samples": 5, "seed": 0}),
        ("guided_backprop", {}),
    ):
        got = fastsal.evaluate(
            net, images, [[1]] * 2, fastsal.metrics.MPRT(final_only=True), method=method, **options
        )
        similarity[method] = float(np.mean(got["mprt"]))
    assert abs(similarity["saliency"]) < 0.1 and abs(similarity["smoothgrad"]) < 0.15, similarity
    assert similarity["guided_backprop"] > max(similarity["saliency"], similarity["smoothgrad"]) + 0.05, (
        similarity
    )
    for name, blobs in net.params.items():
        np.testing.assert_array_equal(blobs[0].data, before[name])
