"""The files users hand fastsal: weights that are no Caffe weights or fit the net only in part, Caffe's
log chatter while loading, images in every Pillow mode (against caffe.io.load_image, or the picture as
Pillow shows it where Caffe misreads it), and the reasons recorded for images that do not decode."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import caffe
import caffe.io
import numpy as np
import pytest
from PIL import Image

import fastsal
from conftest import _input, conv, fc, layer, make_net, write
from fastsal._preprocess import ImageError, load_image

GOOD = (
    _input((3, 6, 6), batch=1)
    + conv("conv", "data", 4)
    + layer("relu", "ReLU", "conv", "conv")
    + fc("fc", "conv", 3)
    + layer("prob", "Softmax", "fc")
)


@pytest.fixture
def model(tmp_path):
    """The GOOD prototxt and its seeded weights."""
    net = make_net(tmp_path, GOOD, seed=9)
    net.save(str(tmp_path / "good.caffemodel"))
    return write(tmp_path, GOOD, "good.prototxt"), tmp_path / "good.caffemodel"


def assert_same_params(net, reference, layers):
    for name in layers:
        for ours, theirs in zip(net.params[name], reference.params[name]):
            np.testing.assert_array_equal(ours.data, theirs.data)


# ---- 1. weights that are no Caffe weights, or fit the net only in part ----


TEXT = "does not parse as a Caffe NetParameter|holds no layers"  # which: the protobuf runtime's call


@pytest.mark.parametrize(
    "content, message",
    [
        (b"These are my notes about the model.\nTop-1 72% on the 2016 split.\n", TEXT),
        (b"", "holds no layers"),
        (b'name: "GoodNet"\nlayer { name: "conv" type: "Convolution" }\n', TEXT),
        (np.random.default_rng(0).bytes(1000), "does not parse as a Caffe NetParameter"),
    ],
    ids=["notes", "empty", "prototxt", "random"],
)
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
def test_load_refuses_files_that_are_no_weights(tmp_path, model, content, message, validate):
    """Caffe's C++ protobuf reads a text file that opens with an end-group byte ('T', 'd', ...) or an
    empty one as an empty NetParameter, and then keeps the net's initial weights."""
    path = tmp_path / "notes.caffemodel"
    path.write_bytes(content)
    pattern = f"notes.caffemodel is not Caffe weights: .*({message})"
    if validate:  # Caffe's reason where Caffe refuses the file itself
        pattern += "|Failed to parse NetParameter file: .*notes.caffemodel"
    with pytest.raises(ValueError, match=pattern):
        fastsal.load(model[0], path, validate=validate)


def test_load_refuses_weights_of_another_net(tmp_path, model):
    other = make_net(tmp_path, GOOD.replace('"conv"', '"conv_a"').replace('"fc"', '"fc_a"'), seed=3)
    other.save(str(tmp_path / "other.caffemodel"))
    with pytest.raises(
        ValueError,
        match=r"other.caffemodel fills none of the net's layers with parameters \(conv, fc\); "
        r"it holds weights for conv_a, fc_a",
    ):
        fastsal.load(model[0], tmp_path / "other.caffemodel")


def test_load_warns_about_layers_left_without_weights(tmp_path, model):
    prototxt, weights = model
    partial = make_net(tmp_path, _input((3, 6, 6), batch=1) + conv("conv", "data", 4), seed=9)
    partial.save(str(tmp_path / "conv_only.caffemodel"))
    with pytest.warns(UserWarning, match=r"conv_only.caffemodel has no weights for layer fc of the net"):
        net = fastsal.load(prototxt, tmp_path / "conv_only.caffemodel")
    assert_same_params(net, caffe.Net(prototxt, caffe.TEST, weights=str(weights)), ["conv"])


def _fewer_values(weights: Path) -> None:
    param = caffe.proto.caffe_pb2.NetParameter()
    param.ParseFromString(weights.read_bytes())
    blob = next(layer for layer in param.layer if layer.name == "fc").blobs[0]
    del blob.data[-1]
    weights.write_bytes(param.SerializeToString())


@pytest.mark.parametrize(
    "change_net, change_weights, message",
    [
        (
            lambda text: text.replace("num_output: 3", "num_output: 5"),
            lambda weights: None,
            r"does not fit the net: param 0 of layer 'fc' has shape \(3, 144\) in the weights, "
            r"\(5, 144\) in the net",
        ),
        (
            lambda text: text,
            _fewer_values,
            r"is broken: param 0 of layer 'fc' has shape \(3, 144\) but holds 431 values",
        ),
    ],
    ids=["shape", "values"],
)
def test_load_refuses_weights_that_do_not_fit_without_the_child_process(
    tmp_path, model, change_net, change_weights, message
):
    """validate=False skips the child process: weights that would fail Caffe's CHECKs must still raise,
    not abort the interpreter (run in a child interpreter, in case they do)."""
    prototxt = write(tmp_path, change_net(GOOD), "other.prototxt")
    change_weights(model[1])
    code = (
        "import sys, fastsal\n"
        "try:\n"
        "    fastsal.load(sys.argv[1], sys.argv[2], validate=False)\n"
        "except ValueError as error:\n"
        "    print('ValueError:', error)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, prototxt, str(model[1])], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert re.search(f"ValueError: .*good.caffemodel {message}", child.stdout), child.stdout


def test_load_reads_legacy_v1_weights(tmp_path, model):
    """Caffe upgrades V1 `layers` (pre-2015 caffemodels) on reading; the check reads them too."""
    prototxt, weights = model
    current = caffe.proto.caffe_pb2.NetParameter()
    current.ParseFromString(weights.read_bytes())
    legacy = caffe.proto.caffe_pb2.NetParameter(name=current.name)
    v1 = caffe.proto.caffe_pb2.V1LayerParameter
    for source in current.layer:
        if source.blobs:
            target = legacy.layers.add(name=source.name)
            target.type = v1.CONVOLUTION if source.type == "Convolution" else v1.INNER_PRODUCT
            target.blobs.extend(source.blobs)
    (tmp_path / "legacy.caffemodel").write_bytes(legacy.SerializeToString())
    net = fastsal.load(prototxt, tmp_path / "legacy.caffemodel")
    assert_same_params(net, caffe.Net(prototxt, caffe.TEST, weights=str(weights)), ["conv", "fc"])


@pytest.mark.parametrize("suffix", [".h5", ".caffemodel.h5"])
def test_load_reads_hdf5_weights(tmp_path, model, suffix):
    """Caffe reads HDF5 weights (its own save_hdf5) whatever the name; no NetParameter check for them."""
    prototxt, weights = model
    reference = caffe.Net(prototxt, caffe.TEST, weights=str(weights))
    reference.save_hdf5(str(tmp_path / f"weights{suffix}"))
    net = fastsal.load(prototxt, tmp_path / f"weights{suffix}")
    assert_same_params(net, reference, ["conv", "fc"])


# ---- 2. Caffe's INFO log while loading ----


def test_load_keeps_caffes_log_quiet_and_restores_the_level(model):
    """3,800 INFO lines for open_nsfw otherwise. In a fresh interpreter that never set the level:
    fastsal.load and a first fastsal.compute print nothing (Caffe's "Ignoring source layer" lines
    included), and a caffe.Net built afterwards logs as before (level restored)."""
    prototxt, weights = model
    code = (
        "import sys, caffe, fastsal, numpy as np\n"
        "net = fastsal.load(sys.argv[1], sys.argv[2])\n"
        "fastsal.compute(net, np.ones((1, 3, 6, 6), np.float32), 0)  # its internal net leaves out prob\n"
        "print('--- loaded ---', file=sys.stderr, flush=True)\n"
        "caffe.Net(sys.argv[1], caffe.TEST)\n"
        "fastsal.set_caffe_log_level(2)\n"
        "fastsal.load(sys.argv[1], sys.argv[2])\n"
        "print('--- quiet ---', file=sys.stderr, flush=True)\n"
        "caffe.Net(sys.argv[1], caffe.TEST)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, prototxt, str(weights)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-2000:]
    during, after, quiet = re.split(r"^--- (?:loaded|quiet) ---$", child.stderr, flags=re.M)
    # INFO and WARNING lines; a CUDA build without a GPU logs two honest ERROR lines (no cuBLAS handle).
    glog = re.compile(r"^[IW]\d{4}", re.M)
    assert not glog.search(during), during[:2000]
    assert re.search(r"^I\d{4}.*Initializing net from parameters", after, re.M)  # level 0 again
    assert not glog.search(quiet)  # the user's level 2 kept


# ---- 3. images in every Pillow mode ----

_RNG = np.random.default_rng(11)
RGB = _RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
SIXTEEN = _RNG.integers(0, 65536, (9, 11), dtype=np.uint16)
THIRTY_TWO = _RNG.integers(0, 2**31 - 1, (9, 11)).astype(np.int32)
FLOATS = _RNG.random((9, 11)).astype(np.float32)


ALPHA = _RNG.integers(0, 256, (9, 11, 1), dtype=np.uint8)


def _rgba():
    return Image.fromarray(np.concatenate([RGB, ALPHA], axis=2))


def _palette_with_transparency():
    picture = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    picture.info["transparency"] = 3
    return picture


# id: (the picture, file name, save options, oracle). Oracles: "caffe" is caffe.io.load_image; "shown"
# is Pillow's convert("RGB"), for files caffe.io.load_image misreads; "16-bit" is the samples / 65535.
MODES = {
    "1": (lambda: Image.fromarray(RGB).convert("1"), "a.png", {}, "caffe"),
    "L": (lambda: Image.fromarray(RGB).convert("L"), "a.png", {}, "caffe"),
    "LA-png": (lambda: _rgba().convert("LA"), "a.png", {}, "shown"),  # caffe: 2 channels
    "LA-tiff": (lambda: _rgba().convert("LA"), "a.tif", {}, "shown"),
    "P": (lambda: Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE), "a.png", {}, "caffe"),
    "P-transparent-index": (_palette_with_transparency, "a.png", {"transparency": 3}, "caffe"),
    "P-alpha-palette": (lambda: _rgba().quantize(16), "a.png", {}, "caffe"),
    "P-gif": (lambda: Image.fromarray(RGB).convert("P"), "a.gif", {}, "shown"),  # caffe: (1, H, W, 3)
    "PA": (lambda: _rgba().convert("PA"), "a.tif", {}, "shown"),  # caffe: index and alpha
    "RGB": (lambda: Image.fromarray(RGB), "a.png", {}, "caffe"),
    "RGB-jpeg": (lambda: Image.fromarray(RGB), "a.jpg", {"quality": 95}, "caffe"),
    "RGB-webp": (lambda: Image.fromarray(RGB), "a.webp", {"lossless": True}, "caffe"),
    "RGBA": (_rgba, "a.png", {}, "caffe"),
    "RGBA-tiff": (_rgba, "a.tif", {}, "caffe"),
    "CMYK-jpeg": (lambda: Image.fromarray(RGB).convert("CMYK"), "a.jpg", {"quality": 95}, "shown"),
    "CMYK-tiff": (lambda: Image.fromarray(RGB).convert("CMYK"), "a.tif", {}, "shown"),
    "YCbCr-jpeg": (lambda: Image.fromarray(RGB).convert("YCbCr"), "a.jpg", {"quality": 95}, "caffe"),
    "YCbCr-tiff": (lambda: Image.fromarray(RGB).convert("YCbCr"), "a.tif", {}, "shown"),
    "LAB": (lambda: Image.fromarray(RGB).convert("LAB"), "a.tif", {}, "shown"),
    "HSV": (lambda: Image.fromarray(RGB).convert("HSV"), "a.tif", {}, "shown"),
    "I;16-png": (lambda: Image.fromarray(SIXTEEN), "a.png", {}, "caffe"),
    "I;16-tiff": (lambda: Image.fromarray(SIXTEEN), "a.tif", {}, "caffe"),
    "I;16B-tiff": (lambda: Image.fromarray(SIXTEEN).convert("I;16B"), "a.tif", {}, "caffe"),
    "I-16-bit-pgm": (lambda: Image.fromarray(SIXTEEN), "a.pgm", {}, "16-bit"),  # caffe: samples / 2**31
    "I-32-bit-tiff": (lambda: Image.fromarray(THIRTY_TWO), "a.tif", {}, "caffe"),
    "F": (lambda: Image.fromarray(FLOATS), "a.tif", {}, "caffe"),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_pillow_mode_decodes_as_rgb(tmp_path, mode):
    make, name, options, oracle = MODES[mode]
    path = tmp_path / name
    try:
        make().save(path, **options)
    except OSError as error:  # Pillow writes HSV to no format
        pytest.skip(f"Pillow cannot write mode {mode} to {path.suffix}: {error}")
    image = load_image(path)
    assert image.shape == (9, 11, 3) and image.dtype == np.float32
    if oracle == "caffe":
        with warnings.catch_warnings():  # Pillow, under imageio, on palettes with alpha: its business
            warnings.simplefilter("ignore")
            expected = caffe.io.load_image(str(path))
        np.testing.assert_array_equal(image, expected)
    elif oracle == "16-bit":
        np.testing.assert_allclose(image, np.repeat(SIXTEEN[..., None] / 65535, 3, axis=2), rtol=1e-6)
    else:
        with Image.open(path) as shown:
            expected = np.asarray(shown.convert("RGB"), np.float32) / 255
        np.testing.assert_allclose(image, expected, rtol=1e-6)
    grey = load_image(path, color=False)
    assert grey.shape == (9, 11, 1) and grey.dtype == np.float32


# ---- 4. reasons for images that do not decode ----


@pytest.mark.parametrize(
    "content, reason",
    [
        (
            b"this is not an image",
            r"cannot decode \(UnidentifiedImageError\): not an image file Pillow recognises",
        ),
        (b"", r"cannot decode \(UnidentifiedImageError\): not an image file Pillow recognises"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), r"cannot decode \(\w+\): "),
    ],
    ids=["text", "empty", "broken-png"],
)
def test_decode_failures_have_stable_reasons(tmp_path, content, reason):
    path = tmp_path / "picture.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as raised:
        load_image(path)
    assert not re.search(r"0x[0-9a-f]{6,}|<\w[^>]* object", str(raised.value)), str(raised.value)
    with pytest.raises(ImageError) as again:
        load_image(Path(str(path)))
    assert str(again.value) == str(raised.value)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.full((8, 8, 3), 200, np.uint8), TypeError, "must hold floats in \\[0, 1\\]"),
        (np.full((8, 8, 3), 200.0, np.float32), ValueError, "pixel values run from 200 to 200"),
        (np.full((8, 8, 3), -0.5, np.float64), ValueError, "pixel values run from -0.5"),
    ],
    ids=["uint8", "floats-0-255", "negative"],
)
def test_preprocessing_takes_pictures_in_0_1(image, error, message):
    """Pixels of another range would come out scaled wrong, silently: refused, naming the range."""
    from fastsal import Preprocessing

    pre = Preprocessing((3, 6, 6), mean=[100.0, 110.0, 120.0])
    with pytest.raises(error, match=message):
        pre(image)
    assert pre(np.full((8, 8, 3), 0.5, np.float32)).shape == (3, 6, 6)
