"""Overlays a person can look at: maps placed back on the original photo through the preprocessing's
resize and crop (Caffe's own caffe.io.resize_image is the oracle), the rendered PNG's layout, signed maps
centred on zero, one overlay per class, .npy inputs, overlays added on a rerun, progress per batch, and
the warning for a forgotten mean."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import zarr
from PIL import Image
from test_jobs import photo, run, run_args

from conftest import _input, conv, fc, layer, make_net
from fastsal import jobs
from fastsal._preprocess import Preprocessing
from fastsal._visualize import OverlayStyle, blend, color_limit, figure_layout, save_overlay

# (photo height, width, images_dim or None, spot (y, x) in the photo): non-square photos, resized
# (squashed) then centre-cropped, and one shown whole (no images_dim: resized to the input only).
CASES = [
    (200, 1200, (40, 64), (90, 640)),
    (300, 120, (60, 40), (170, 50)),
    (90, 150, None, (30, 100)),
]


def spot_picture(h, w, spot, sigma):
    """A grey picture with one bright Gaussian spot, float RGB in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w]
    blob = np.exp(-((y - spot[0]) ** 2 + (x - spot[1]) ** 2) / (2 * sigma**2))
    return np.repeat((0.2 + 0.8 * blob)[..., None], 3, axis=2).astype(np.float32)


@pytest.mark.parametrize("h, w, dims, spot", CASES, ids=["wide", "tall", "whole"])
def test_a_spot_of_the_crop_lands_on_its_place_in_the_photo(h, w, dims, spot):
    preprocessing = Preprocessing((3, 32, 32), images_dim=dims)
    picture = spot_picture(h, w, spot, sigma=max(h, w) / 40)
    crop = preprocessing.crop(picture)  # caffe.io.resize_image, then the centre crop
    hot = np.unravel_index(np.argmax(crop[..., 0]), crop.shape[:2])
    assert 0 < hot[0] < 31 and 0 < hot[1] < 31, "the spot must be inside the crop for this test"
    placed = preprocessing.to_original(crop[..., 0], (h, w))  # the crop itself as the map
    assert placed.shape == (h, w)
    found = np.unravel_index(np.nanargmax(placed), placed.shape)
    step = (h / (dims or (32, 32))[0], w / (dims or (32, 32))[1])  # one crop pixel, in photo pixels
    assert abs(found[0] - spot[0]) <= step[0] and abs(found[1] - spot[1]) <= step[1]
    # NaN exactly outside the centre crop's footprint on the photo
    dims = dims or (32, 32)
    top, left = (dims[0] - 32) // 2 * h / dims[0], (dims[1] - 32) // 2 * w / dims[1]
    bottom, right = top + 32 * h / dims[0], left + 32 * w / dims[1]
    rows, cols = np.arange(h) + 0.5, np.arange(w) + 0.5
    inside = ((rows >= top) & (rows <= bottom))[:, None] & ((cols >= left) & (cols <= right))[None, :]
    np.testing.assert_array_equal(np.isfinite(placed), inside)


def hottest(png_path, h, w, colour):
    """The photo pixel (y, x) of a rendered overlay whose colour is nearest ``colour``."""
    picture = np.asarray(Image.open(png_path).convert("RGB"), np.float32) / 255
    scale, top, total = figure_layout(h, w)
    assert picture.shape == (total, w * scale, 3)
    area = picture[top : top + h * scale]
    distance = np.linalg.norm(area - np.asarray(colour[:3]), axis=2)
    y, x = np.unravel_index(np.argmin(distance), distance.shape)
    return y // scale, x // scale


@pytest.mark.parametrize("h, w, dims, spot", CASES[:2], ids=["wide", "tall"])
def test_the_rendered_overlay_shows_the_spot_at_the_photos_pixel(h, w, dims, spot, tmp_path):
    preprocessing = Preprocessing((3, 32, 32), images_dim=dims)
    picture = spot_picture(h, w, spot, sigma=max(h, w) / 40)
    saliency = preprocessing.crop(picture)[..., 0] - 0.2  # 0 on the grey, 0.8 at the spot
    placed = preprocessing.to_original(saliency, (h, w))
    photo_ = np.full((h, w, 3), 128, np.uint8)  # plain grey: only the map has colour
    style = OverlayStyle(cmap="viridis", alpha=1.0, outlier_perc=0.0)
    save_overlay(tmp_path / "o.png", photo_, placed, "class 1 spot: score 1\nphoto", style, signed=False)
    found = hottest(tmp_path / "o.png", h, w, matplotlib.colormaps["viridis"](1.0))
    step = (h / dims[0], w / dims[1])
    assert abs(found[0] - spot[0]) <= 2 * step[0] and abs(found[1] - spot[1]) <= 2 * step[1]


def test_signed_maps_are_centred_on_zero():
    photo_ = np.full((4, 3, 3), 100, np.uint8)
    saliency = np.array([[-2, -1, 0]] * 4, np.float32)
    saliency[0, 0] = 2
    colormap = matplotlib.colormaps["bwr"]
    out = blend(photo_, saliency, colormap, 1.0, color_limit(saliency, 0.0), signed=True)
    np.testing.assert_allclose(out[0, 0], colormap(1.0)[:3], atol=1e-6)  # +max: the map's top colour
    np.testing.assert_allclose(out[1, 0], colormap(0.0)[:3], atol=1e-6)  # -max: its bottom colour
    np.testing.assert_allclose(out[1, 2], 100 / 255, atol=1e-6)  # zero: the photo as it is
    np.testing.assert_allclose(out[1, 1], 0.5 * (100 / 255) + 0.5 * np.asarray(colormap(0.25)[:3]), atol=1e-6)


def test_the_photo_keeps_its_colours_under_a_zero_map():
    photo_ = np.random.default_rng(0).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    out = blend(photo_, np.zeros((5, 6), np.float32), matplotlib.colormaps["inferno"], 0.7, 1.0, False)
    np.testing.assert_allclose(out, photo_ / 255, atol=1e-6)


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(3)
    Image.fromarray(photo(rng, 40, 240)).save(folder / "wide.png")
    Image.fromarray(photo(rng, 90, 36)).save(folder / "tall.jpg")
    Image.fromarray(photo(rng, 50, 50)).save(folder / "square.png")
    return folder


def test_one_overlay_per_class_at_the_photos_size(model, wide_images, tmp_path):
    out, folder = tmp_path / "maps.zarr", tmp_path / "overlays"
    labels = tmp_path / "names.txt"
    labels.write_text("".join(f"n0144076{i} name {i}\n" for i in range(5)))
    common = ("--top-k", 3, "--images-dim", "40,48", "--mean-value", "104,117,123", "--quiet")
    assert run(*run_args(model, wide_images, out, *common, "--overlays", folder, "--labels", labels)) == 0
    store = zarr.open_group(str(out), mode="r")
    for index, path in enumerate(store["paths"][:]):
        with Image.open(path) as original:
            w, h = original.size
        for class_id in store["classes"][index]:
            name = jobs.overlay_name(index, Path(str(path)).stem, int(class_id))
            with Image.open(folder / name) as overlay:
                scale, _, total = figure_layout(h, w)
                assert overlay.size == (w * scale, total)
    assert len(list(folder.glob("*.png"))) == 9


def test_overlays_added_on_a_rerun_of_a_finished_store(model, wide_images, tmp_path, capsys):
    out, folder = tmp_path / "maps.zarr", tmp_path / "overlays"
    common = ("--top-k", 2, "--mean-value", "104,117,123", "--quiet")
    assert run(*run_args(model, wide_images, out, *common)) == 0
    assert run(*run_args(model, wide_images, out, *common, "--overlays", folder)) == 0
    assert "already done" in capsys.readouterr().out
    assert len(list(folder.glob("*.png"))) == 6


def test_overlays_of_npy_inputs_show_the_input(model, tmp_path):
    rng = np.random.default_rng(4)
    inputs = rng.normal(0, 30, (3, 3, 32, 32)).astype(np.float32)
    inputs[1, :, 4:9, 20:26] = 200.0  # a bright block of the second input
    np.save(tmp_path / "inputs.npy", inputs)
    out, folder = tmp_path / "maps.zarr", tmp_path / "overlays"
    assert run(*run_args(model, tmp_path / "inputs.npy", out, "--quiet", "--overlays", folder)) == 0
    pngs = sorted(folder.glob("000001_input_class*.png"))
    assert len(pngs) == 1 and len(list(folder.glob("*.png"))) == 3
    picture = np.asarray(Image.open(pngs[0]).convert("RGB"))
    scale, top, _ = figure_layout(32, 32)
    area = picture[top : top + 32 * scale : scale, ::scale].astype(int).sum(axis=2)
    y, x = np.unravel_index(np.argmax(area), area.shape)
    assert 4 <= y < 9 and 20 <= x < 26  # the block is the input's brightest part, in the overlay too


def test_progress_moves_per_batch(model, wide_images, tmp_path):
    spec, attribution, lock = jobs._prepare(
        wide_images, *model, tmp_path / "maps.zarr", top_k=1, mean_value=[104, 117, 123], batch_size=2
    )
    updates = []

    class Progress:
        def update(self, n):
            updates.append(n)

    with lock:
        jobs._run_local(jobs.Worker(spec, attribution), list(range(spec.chunks)), Progress())
    assert updates == [2, 1]  # two batches of the one chunk's three images (all ok)


def test_a_forgotten_mean_warns_once(tmp_path):
    # A net sure of plain grey unless the ImageNet mean is subtracted: one class weighs every input.
    text = _input((3, 8, 8), batch=1) + fc("fc", "data", 6) + layer("prob", "Softmax", "fc")
    net = make_net(tmp_path, text, seed=1)
    weights = np.zeros_like(net.params["fc"][0].data)
    weights[2] = 20.0 / (192 * 127.5)  # logit 20 on 127.5-grey inputs, about 2 with the mean taken off
    net.params["fc"][0].data[...] = weights
    net.params["fc"][1].data[...] = 0
    net.save(str(tmp_path / "net.caffemodel"))
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "a.png")
    model = (str(tmp_path / "net.prototxt"), str(tmp_path / "net.caffemodel"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs.run_job(tmp_path / "a.png", *model, tmp_path / "no_mean.zarr", quiet=True)
    forgotten = [w for w in caught if "no mean given" in str(w.message)]
    assert len(forgotten) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs.run_job(
            tmp_path / "a.png", *model, tmp_path / "mean.zarr", quiet=True, mean_value=[104, 117, 123]
        )
    assert not [w for w in caught if "no mean given" in str(w.message)]


@pytest.mark.parametrize("trained_with_mean", [True, False], ids=["trained_with_mean", "trained_without"])
def test_a_forgotten_mean_is_told_by_batchnorm_statistics(tmp_path, trained_with_mean):
    text = (
        _input((3, 8, 8), batch=1)
        + conv("conv1", "data", 4)
        + layer("bn1", "BatchNorm", "conv1", "conv1")
        + layer("relu1", "ReLU", "conv1", "conv1")
        + fc("fc", "conv1", 5)
        + layer("prob", "Softmax", "fc")
    )
    net = make_net(tmp_path, text, seed=3)
    # The recorded means: conv1's response (Caffe's forward) to grey preprocessed as in training.
    mean = [104.0, 117.0, 123.0] if trained_with_mean else None
    grey = Preprocessing((3, 8, 8), mean=mean).transform(np.full((8, 8, 3), 0.5, np.float32))
    net.blobs["data"].data[...] = grey
    net.forward(end="conv1")
    net.params["bn1"][0].data[...] = net.blobs["conv1"].data[0].mean(axis=(1, 2))
    net.params["bn1"][1].data[...] = 4.0
    net.params["bn1"][2].data[...] = 1.0
    net.save(str(tmp_path / "net.caffemodel"))
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "a.png")
    model = (str(tmp_path / "net.prototxt"), str(tmp_path / "net.caffemodel"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs.run_job(tmp_path / "a.png", *model, tmp_path / "maps.zarr", quiet=True)
    told = [str(w.message) for w in caught if "no mean given" in str(w.message)]
    assert len(told) == (1 if trained_with_mean else 0)
    assert all("BatchNorm 'bn1'" in message for message in told)


def test_a_one_pixel_wide_photo_is_not_enlarged_past_the_limit(tmp_path):
    """A 2000 x 1 photo was enlarged 360 times each way: a 5.8 GiB array, then the OOM killer."""
    scale, _, total = figure_layout(2000, 1)
    assert 2000 * scale <= 4096 and total < 5000
    photo_ = np.zeros((2000, 1, 3), np.uint8)
    save_overlay(tmp_path / "tall.png", photo_, np.ones((2000, 1), np.float32), "tall", OverlayStyle(), False)
    with Image.open(tmp_path / "tall.png") as image:
        assert image.size[1] < 5000


def test_colour_bar_labels_carry_the_scale(tmp_path, monkeypatch):
    """A map of small values: every colour-bar label says its value (the axis's "1e-5" offset text fell
    outside the figure, so a bar of 1e-5 values read -7.5 ... 7.5)."""
    from matplotlib.figure import Figure

    from fastsal._visualize import OverlayStyle, save_overlay

    drawn = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), savefig(self, *a, **k)))
    rng = np.random.default_rng(0)
    photo = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    save_overlay(tmp_path / "o.png", photo, rng.normal(0, 1e-5, (40, 40)), "small", OverlayStyle(), True)
    labels = [t.get_text() for t in drawn[0].axes[1].get_xticklabels()]
    assert any("e-05" in label for label in labels), labels
