"""Class-model visualisation and deep dream: scores rise, batched equals one at a time, the notebook's
make_step through pycaffe as the reference, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import fastsal
from conftest import NETS, _input, conv, fc, force_backward_copy, layer, make_net, producer_layer

# resnet_block ends in ReLU -> global average pooling -> fc: its pooled features are >= 0, so a class
# whose fc weights another class's dominate can never win, whatever the image. Its scores still rise.
CLASSIFIABLE = sorted(set(NETS) - {"resnet_block_bn_scale_eltwise"})


def final_scores(net, score, images):
    net.blobs["data"].reshape(*images.shape)
    return net.forward(data=images, end=producer_layer(net, score))[score].reshape(len(images), -1).copy()


PICTURE_NETS = [name for name in sorted(NETS) if "shape { dim: 2 dim: 3 " in NETS[name][0]]  # RGB nets


@pytest.mark.parametrize(
    "name, options",
    [(name, {"parameterization": "pixel", "learning_rate": 0.2}) for name in sorted(NETS)]
    + [(name, {"transforms": False}) for name in PICTURE_NETS],  # 12x12 random nets: no shift-robust class
    ids=[f"pixel-{name}" for name in sorted(NETS)] + [f"fourier-{name}" for name in PICTURE_NETS],
)
def test_every_class_score_rises_and_wins(tmp_path, name, options):
    text, score = NETS[name]
    net = make_net(tmp_path, text, seed=len(name))
    n = net.blobs[score].data[0].size
    if "parameterization" not in options:  # pixels of either sign, as the pixel runs have
        shape = net.blobs["data"].data.shape[1:]
        options["preprocessing"] = fastsal.Preprocessing(shape, mean=np.full(3, 127.5, np.float32))
    images, history = fastsal.visualize_classes(
        net, range(n), score=score, iterations=200, return_scores=True, **options
    )
    assert images.shape == (n, *net.blobs["data"].data.shape[1:])
    assert history.shape == (201, n) and (history[-1] > history[0]).all()
    scores = final_scores(net, score, images)
    np.testing.assert_allclose(scores[np.arange(n), np.arange(n)], history[-1], rtol=1e-4, atol=1e-5)
    if name in CLASSIFIABLE:
        np.testing.assert_array_equal(scores.argmax(axis=1), np.arange(n))


@pytest.mark.parametrize("preset", ["simonyan", "yosinski", None])
def test_batched_equals_one_class_at_a_time(tmp_path, preset):
    net = make_net(tmp_path, NETS["inception_concat_lrn_no_softmax"][0], seed=3)
    options = dict(iterations=12, preset=preset, seed=5, score="score")  # None: Fourier, transforms
    together = fastsal.visualize_classes(net, [1, 4, 2], **options)
    for row, c in enumerate([1, 4, 2]):
        alone = fastsal.visualize_classes(net, [c], **options)[0]
        np.testing.assert_allclose(together[row], alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())


def test_jitter_and_regularisers_keep_batching_exact(tmp_path):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0], seed=3)
    options = dict(
        iterations=10,
        jitter=3,
        decay=0.01,
        blur_radius=0.5,
        blur_every=3,
        clip_norm_percentile=10,
        parameterization="pixel",
    )
    together = fastsal.visualize_classes(net, [0, 6], **options)
    alone = fastsal.visualize_classes(net, [6], **options)[0]
    np.testing.assert_allclose(together[1], alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())
    preprocessing = fastsal.Preprocessing((3, 12, 12), mean=np.array([100.0, 110.0, 120.0], np.float32))
    clipped = fastsal.visualize_classes(
        net, [0], iterations=5, learning_rate=1e4, preprocessing=preprocessing, parameterization="pixel"
    )
    pixels = preprocessing.deprocess(clipped[0])  # inside [0, 255] before rounding: nothing clipped away
    assert clipped[0].max() <= 255 - 100 + 1e-3 and clipped[0].min() >= -120 - 1e-3 and pixels.std() > 0


DREAM_NET = (
    _input((3, 16, 16), batch=1)
    + conv("conv1", "data", 6)
    + layer("relu1", "ReLU", "conv1", "conv1")
    + layer("pool1", "Pooling", "conv1", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    + conv("conv2", "pool1", 8)
    + layer("relu2", "ReLU", "conv2", "conv2")
    + fc("fc", "conv2", 4)
)


def notebook_dream(net, path, image, end, steps, step_size):
    """Google's deepdream notebook's make_step through pycaffe: one octave, jitter and clipping off."""
    reference = force_backward_copy(net, path)
    src = reference.blobs["data"]
    src.reshape(1, *image.shape)
    reference.reshape()
    src.data[0] = image
    last = producer_layer(reference, end)
    for _ in range(steps):
        reference.forward(end=last)
        dst = reference.blobs[end]
        dst.diff[:] = dst.data
        reference.backward(start=last)
        g = src.diff[0]
        src.data[:] += step_size / np.abs(g).mean() * g
    return src.data[0].copy()


@pytest.mark.parametrize("end", ["conv2", "pool1"])
def test_dream_matches_the_notebook_make_step(tmp_path, rng, end):
    net = make_net(tmp_path, DREAM_NET, seed=8)
    image = rng.standard_normal((3, 16, 16)).astype(np.float32) * 20
    expected = notebook_dream(net, str(tmp_path / "net.prototxt"), image, end, steps=4, step_size=1.5)
    got = fastsal.dream(net, image, end, octaves=1, iterations=4, jitter=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_dream_octaves_at_any_size_raise_the_norm_and_are_deterministic(tmp_path, rng):
    net = make_net(tmp_path, DREAM_NET, seed=8)
    image = rng.standard_normal((3, 41, 37)).astype(np.float32) * 20  # not the net's 16x16
    dreamt, norms = fastsal.dream(net, image, "conv2", octaves=3, iterations=5, seed=4, return_norms=True)
    assert dreamt.shape == image.shape and len(norms) == 3
    assert all(after > before for before, after in norms)
    np.testing.assert_array_equal(fastsal.dream(net, image, "conv2", octaves=3, iterations=5, seed=4), dreamt)
    other = fastsal.dream(net, image, "conv2", octaves=3, iterations=5, seed=5)
    assert np.abs(other - dreamt).max() > 0
    guide = rng.standard_normal((3, 20, 24)).astype(np.float32) * 20
    guided = fastsal.dream(net, image, "conv2", octaves=2, iterations=3, guide=guide)
    plain = fastsal.dream(net, image, "conv2", octaves=2, iterations=3)
    assert guided.shape == image.shape and np.abs(guided - plain).max() > 1e-3


def test_guide_objective_matches_its_formula(tmp_path, rng):
    """The notebook's objective_guide: each position's diff is the guide feature with the largest dot
    product with it; one step, checked through pycaffe."""
    net = make_net(tmp_path, DREAM_NET, seed=8)
    path = str(tmp_path / "net.prototxt")
    image = rng.standard_normal((3, 16, 16)).astype(np.float32) * 20
    guide = rng.standard_normal((3, 16, 16)).astype(np.float32) * 20
    reference = force_backward_copy(net, path)
    last = producer_layer(reference, "conv2")
    reference.blobs["data"].data[0] = guide
    reference.forward(end=last)
    y = reference.blobs["conv2"].data[0].reshape(8, -1).copy()
    reference.blobs["data"].data[0] = image
    reference.forward(end=last)
    x = reference.blobs["conv2"].data[0].reshape(8, -1)
    reference.blobs["conv2"].diff[0] = y[:, x.T.dot(y).argmax(1)].reshape(8, 8, 8)
    reference.backward(start=last)
    g = reference.blobs["data"].diff[0]
    expected = image + 1.5 / np.abs(g).mean() * g
    got = fastsal.dream(net, image, "conv2", octaves=1, iterations=1, jitter=0, guide=guide)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"layer": "nowhere"}, ValueError, "unknown layer blob 'nowhere'"),
        ({"layer": "data"}, ValueError, "is not computed from input blob 'data'"),
        ({"octaves": 0}, ValueError, "octaves must be a positive integer"),
        ({"octave_scale": 1.0}, ValueError, "octave_scale must be > 1"),
        ({"step_size": -1.0}, ValueError, "step_size must be >= 0"),
        ({"image": np.zeros((4, 16, 16))}, ValueError, r"image must be one \(3, H, W\) image"),
        ({"image": np.full((3, 16, 16), np.nan)}, ValueError, "image contains NaN"),
        ({"guide": np.zeros((1, 16, 16))}, ValueError, r"guide must be one \(3, H, W\) image"),
    ],
    ids=["unknown", "input", "octaves", "scale", "step", "channels", "nan", "guide"],
)
def test_dream_refuses_bad_input(tmp_path, options, error, message):
    net = make_net(tmp_path, DREAM_NET, seed=8)
    call = {"image": np.zeros((3, 16, 16), np.float32), "layer": "conv2", **options}
    image, name = call.pop("image"), call.pop("layer")
    with pytest.raises(error, match=message):
        fastsal.dream(net, image, name, **call)


def test_dream_image_too_small_for_the_layers_is_refused_not_fatal(tmp_path):
    """A 5x5 unpadded convolution on a 2x2 image would give Caffe a negative size (a CHECK abort)."""
    net = make_net(
        tmp_path, _input((3, 16, 16), batch=1) + conv("big", "data", 4, k=5, pad=0) + fc("fc", "big", 2)
    )
    with pytest.raises(ValueError, match=r"images of 2x2 are too small for layer 'big' \(Convolution\)"):
        fastsal.dream(net, np.zeros((3, 2, 2), np.float32), "big", octaves=1)
    with pytest.raises(ValueError, match="too small"):
        fastsal.dream(net, np.zeros((3, 16, 16), np.float32), "big", octaves=4, octave_scale=3.0)


def test_visualize_refuses_bad_input(tmp_path):
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    with pytest.raises(ValueError, match=r"class 9 \(classes\[0, 1\]\) is out of range"):
        fastsal.visualize_classes(net, [1, 9])
    with pytest.raises(ValueError, match="preset must be one of simonyan, yosinski"):
        fastsal.visualize_classes(net, [1], preset="mine")
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        fastsal.visualize_classes(net, [1], learning_rate=0)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        fastsal.visualize_classes(net, [1], iterations=0)
    with pytest.raises(ValueError, match="parameterization must be 'fourier' or 'pixel'"):
        fastsal.visualize_classes(net, [1], parameterization="lucid")
    with pytest.raises(
        ValueError, match=r"decay, jitter apply to parameterization='pixel' \(or a preset\) only"
    ):
        fastsal.visualize_classes(net, [1], decay=0.1, jitter=2)
    with pytest.raises(ValueError, match=r"preprocessing is for input shape \(3, 9, 9\)"):
        fastsal.visualize_classes(net, [1], preprocessing=fastsal.Preprocessing((3, 9, 9)))
    four = make_net(tmp_path, NETS["conv_strides_groups_dilation_leaky"][0])
    with pytest.raises(
        ValueError, match="nets of 1 or 3 channels; this net takes 4: use parameterization='pixel'"
    ):
        fastsal.visualize_classes(four, [1])
    fastsal.visualize_classes(four, [1], iterations=1, parameterization="pixel")


def test_fourier_maps_adjoints_and_lucids_colour_matrix(rng):
    """Each map's adjoint by the dot-product test, <A x, y> = <x, A^T y>, in float64."""
    from fastsal import _imageparam as maps

    for h, w in ((8, 8), (7, 9), (6, 5)):
        spectrum = maps.Spectrum(h, w)
        p, g = rng.standard_normal(spectrum.parameter_shape((2, 3))), rng.standard_normal((2, 3, h, w))
        np.testing.assert_allclose(
            np.sum(spectrum.forward(p) * g), np.sum(p * spectrum.adjoint(g)), rtol=1e-10
        )
        warp = maps.random_affine(rng, h, w, translate=0.2, scales=[0.9, 1.1], angles=[-7, 7])
        a, b = rng.standard_normal((3, h, w)), rng.standard_normal((3, h, w))
        np.testing.assert_allclose(
            np.sum(maps.apply_affine(warp, a) * b), np.sum(a * maps.apply_affine(warp, b, transpose=True))
        )
        np.testing.assert_allclose(np.sum(maps.decorrelate(a) * b), np.sum(a * maps.decorrelate_adjoint(b)))
    # the 1/f scaling from its formula: a unit coefficient at frequency (0, 2/W) is a cosine of amplitude
    # 2 * scale / sqrt(HW), scale = 1 / (4 * 2/W)
    spectrum = maps.Spectrum(16, 16)
    p = np.zeros(spectrum.parameter_shape(()))
    p[0, 2, 0] = 1
    x = np.arange(16)
    expected = 2 * (16 / 2 / 4) / 16 * np.cos(2 * np.pi * 2 * x / 16)
    np.testing.assert_allclose(spectrum.forward(p), np.tile(expected, (16, 1)), atol=1e-12)
    # Lucid's matrix, its largest column norm scaled to 1
    assert np.linalg.norm(maps.COLOR_CORRELATION, axis=0).max() == pytest.approx(1)
    np.testing.assert_allclose(
        maps.COLOR_CORRELATION[0] / maps.COLOR_CORRELATION[1, 0], [0.26 / 0.27, 0.09 / 0.27, 0.02 / 0.27]
    )
    # the identity warp leaves an image as it is; a shift by one pixel moves it by one pixel
    image = rng.standard_normal((3, 6, 5))
    identity = maps.random_affine(rng, 6, 5, translate=0, scales=[1.0], angles=[0])
    np.testing.assert_allclose(maps.apply_affine(identity, image), image)


def test_fourier_chain_rule_matches_finite_differences(tmp_path, rng):
    """d score / d spectrum through the colour matrix, sigmoid, a random warp and the preprocessing
    (mean, raw_scale, input_scale, RGB to BGR) against central differences of the net's score."""
    from fastsal._dream import TRANSFORMS, _FourierImages
    from fastsal._imageparam import random_affine

    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0], seed=5)
    preprocessing = fastsal.Preprocessing(
        (3, 12, 12), mean=np.array([100.0, 110.0, 120.0], np.float32), input_scale=0.02
    )
    images = _FourierImages((3, 12, 12), preprocessing)
    engine = fastsal.Saliency(net, score="fc")
    parameters = rng.standard_normal(images.spectrum.parameter_shape((1, 3))) * 0.5
    warps = [random_affine(rng, 12, 12, **(TRANSFORMS | {"translate": 0.2}))]
    klass = np.array([2], np.int32)

    def score(p):
        out = np.empty((1, engine.num_classes), np.float32)
        engine._engine.scores(np.ascontiguousarray(images.forward(p, warps)[1], np.float32), out)
        return float(out[0, 2])

    rgb, inputs = images.forward(parameters, warps)
    gradient = np.empty((1, 1, 3, 12, 12), np.float32)
    engine._engine.compute(
        np.ascontiguousarray(inputs, np.float32), klass.reshape(1, 1), gradient, reduce="none"
    )
    analytic = images.backward(rgb, warps, gradient[:, 0])
    agree = []
    for index in zip(*(rng.integers(0, n, 20) for n in parameters.shape)):
        step = np.zeros_like(parameters)
        step[index] = 1e-3
        numeric = (score(parameters + step) - score(parameters - step)) / 2e-3
        agree.append(
            abs(numeric - analytic[index]) <= 2e-2 * abs(analytic[index]) + 1e-3 * np.abs(analytic).max()
        )
    assert sum(agree) >= 19, agree  # one may straddle a ReLU or MaxPool kink


@pytest.mark.slow
def test_open_nsfw_default_class_images_are_visible_and_classified(rng):
    from fastsal import examples

    net = fastsal.load(*examples.open_nsfw_files())
    preprocessing = fastsal.Preprocessing((3, 224, 224), mean=examples.OPEN_NSFW_MEAN_BGR)
    images = fastsal.visualize_classes(net, [0, 1], iterations=80, preprocessing=preprocessing)
    np.testing.assert_array_equal(final_scores(net, "fc_nsfw", images).argmax(axis=1), [0, 1])
    for image in images:
        assert_visible(preprocessing.deprocess(image), rng)


@pytest.mark.slow
def test_open_nsfw_visualisation_and_dream():
    from fastsal import examples

    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    preprocessing = fastsal.Preprocessing((3, 224, 224), mean=examples.OPEN_NSFW_MEAN_BGR)
    images, history = fastsal.visualize_classes(
        net,
        [0, 1],
        iterations=30,
        learning_rate=50.0,
        preprocessing=preprocessing,
        return_scores=True,
        parameterization="pixel",
    )
    assert (history[-1] > history[0]).all()
    np.testing.assert_array_equal(final_scores(net, "fc_nsfw", images).argmax(axis=1), [0, 1])
    photo = examples.open_nsfw_batch(["coffee"])[0][0]
    dreamt, norms = fastsal.dream(
        net,
        photo,
        "eltwise_stage1_block0",
        octaves=2,
        iterations=3,
        preprocessing=preprocessing,
        return_norms=True,
    )
    assert all(after > before for before, after in norms) and dreamt.shape == photo.shape


def test_cli_visualize_and_dream_write_pictures(tmp_path, rng):
    from PIL import Image

    from fastsal import cli

    net = make_net(tmp_path, DREAM_NET, seed=8)
    net.save(str(tmp_path / "net.caffemodel"))
    model = [
        "--model-def",
        str(tmp_path / "net.prototxt"),
        "--pretrained-model",
        str(tmp_path / "net.caffemodel"),
    ]
    assert (
        cli.main(["visualize", *model, "--classes", "0,3", "--iterations", "5", "-o", str(tmp_path / "cls")])
        == 0
    )
    for c in (0, 3):
        raw = np.load(tmp_path / "cls" / f"class_{c}.npy")  # the net's input, beside its picture
        assert raw.shape == (3, 16, 16) and raw.dtype == np.float32
        with Image.open(tmp_path / "cls" / f"class_{c}.png") as image:
            assert image.size == (16, 16) and np.asarray(image).std() > 0
            np.testing.assert_array_equal(
                np.asarray(image), fastsal.Preprocessing((3, 16, 16)).deprocess(raw)
            )
    expected = fastsal.visualize_classes(
        net, [3], iterations=5, preprocessing=fastsal.Preprocessing((3, 16, 16))
    )[0]  # the CLI's default is the library's: Fourier, transforms
    np.testing.assert_allclose(np.load(tmp_path / "cls" / "class_3.npy"), expected, rtol=1e-5, atol=1e-3)
    still = ["visualize", *model, "--classes", "3", "--iterations", "5", "--no-transforms", "-o"]
    assert cli.main([*still, str(tmp_path / "still")]) == 0
    expected = fastsal.visualize_classes(
        net, [3], iterations=5, transforms=False, preprocessing=fastsal.Preprocessing((3, 16, 16))
    )[0]
    np.testing.assert_allclose(np.load(tmp_path / "still" / "class_3.npy"), expected, rtol=1e-5, atol=1e-3)
    pixel = ["visualize", *model, "--classes", "1", "--iterations", "3", "--parameterization", "pixel"]
    assert cli.main([*pixel, "--jitter", "2", "-o", str(tmp_path / "px")]) == 0
    assert (tmp_path / "px" / "class_1.npy").exists()
    assert cli.main([*pixel[:-2], "--jitter", "2", "-o", str(tmp_path / "bad")]) == 2  # jitter is pixel-only
    assert not (tmp_path / "bad").exists()
    photo = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    args = [
        "dream",
        str(tmp_path / "photo.png"),
        *model,
        "--layer",
        "conv2",
        "--octaves",
        "2",
        "--iterations",
        "2",
    ]
    assert cli.main([*args, "--mean-value", "100,110,120", "-o", str(tmp_path / "dream.png")]) == 0
    with Image.open(tmp_path / "dream.png") as image:
        assert image.size == (50, 40)
        assert np.abs(np.asarray(image).astype(int) - photo).max() > 0
    assert cli.main([*args, "-o", str(tmp_path / "x.png"), "--layer", "nowhere"]) == 2
    # What is already there is the user's: refused before any work, replaced only with --overwrite.
    before = (tmp_path / "dream.png").read_bytes()
    assert cli.main([*args, "--mean-value", "100,110,120", "-o", str(tmp_path / "dream.png")]) == 2
    assert (tmp_path / "dream.png").read_bytes() == before
    (tmp_path / "cls" / "class_3.npy").write_bytes(b"mine")
    assert (
        cli.main(["visualize", *model, "--classes", "3", "--iterations", "2", "-o", str(tmp_path / "cls")])
        == 2
    )
    assert (tmp_path / "cls" / "class_3.npy").read_bytes() == b"mine"
    assert (
        cli.main(
            [
                "visualize",
                *model,
                "--classes",
                "3",
                "--iterations",
                "2",
                "--overwrite",
                "-o",
                str(tmp_path / "cls"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "cls" / "class_3.npy").shape == (3, 16, 16)


def power_slope(picture: np.ndarray) -> float:
    """Least-squares slope of log power against log radius of a uint8 picture's grey levels, over radii
    1..min(H, W) / 2: about 0 for white noise, about -2 for photographs."""
    grey = picture.astype(np.float64).mean(axis=2)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    h, w = grey.shape
    y, x = np.indices(grey.shape)
    radius = np.hypot(y - h // 2, x - w // 2).round().astype(int).ravel()
    radii = np.arange(1, min(h, w) // 2)
    profile = np.bincount(radius, power.ravel())[radii] / np.bincount(radius)[radii]
    return float(np.polyfit(np.log(radii), np.log(profile + 1e-12), 1)[0])


def assert_visible(picture: np.ndarray, rng) -> None:
    """A picture you can see: std >= 30/255 in display space and a spectrum falling with frequency,
    where white noise of the same spread (the check's own control) is flat."""
    assert picture.dtype == np.uint8 and picture.std() >= 30, picture.std()
    assert power_slope(picture) < -1.0, power_slope(picture)
    noise = np.clip(rng.normal(127.5, picture.std(), picture.shape), 0, 255).astype(np.uint8)
    assert abs(power_slope(noise)) < 0.3


VGG_SHAPED = (  # VGG-16's pattern, small: 3x3 convolution pairs and max pooling, then three fc layers
    _input((3, 48, 48), batch=1)
    + "".join(
        conv(f"conv{b}_{i}", f"conv{b}_{i - 1}" if i > 1 else ("data" if b == 1 else f"pool{b - 1}"), n)
        + layer(f"relu{b}_{i}", "ReLU", f"conv{b}_{i}", f"conv{b}_{i}")
        + (
            layer(
                f"pool{b}",
                "Pooling",
                f"conv{b}_{i}",
                params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }",
            )
            if i == 2
            else ""
        )
        for b, n in ((1, 8), (2, 16), (3, 32))
        for i in (1, 2)
    )
    + fc("fc6", "pool3", 64)
    + layer("relu6", "ReLU", "fc6", "fc6")
    + fc("fc7", "fc6", 64)
    + layer("relu7", "ReLU", "fc7", "fc7")
    + fc("fc8", "fc7", 10)
)


def test_default_class_images_are_visible_and_classified_on_a_vgg_shaped_net(tmp_path, rng):
    """Seeded weights: under the random transformations some random nets' classes cannot win (no
    feature of theirs survives a shift); with seed 4 every class can."""
    net = make_net(tmp_path, VGG_SHAPED, seed=4)
    preprocessing = fastsal.Preprocessing((3, 48, 48), mean=np.array([104.0, 117.0, 123.0], np.float32))
    classes = list(range(10))
    images, history = fastsal.visualize_classes(
        net, classes, iterations=100, preprocessing=preprocessing, return_scores=True
    )
    scores = final_scores(net, "fc8", images)
    np.testing.assert_array_equal(scores.argmax(axis=1), classes)
    np.testing.assert_allclose(scores[np.arange(10), classes], history[-1], rtol=1e-4, atol=1e-4)
    for image in images:
        assert_visible(preprocessing.deprocess(image), rng)
    # the check's own controls: a flat grey picture and the pixel-space ascent's picture both fail it
    with pytest.raises(AssertionError):
        assert_visible(np.full((48, 48, 3), 128, np.uint8), rng)
    pixel = fastsal.visualize_classes(
        net, [0], iterations=100, parameterization="pixel", preprocessing=preprocessing
    )
    with pytest.raises(AssertionError):
        assert_visible(preprocessing.deprocess(pixel[0]), rng)
