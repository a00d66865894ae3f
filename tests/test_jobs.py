"""Jobs over real files on disk into a real Zarr store: against the engine on Caffe's own preprocessing
(caffe.io.load_image + caffe.io.Transformer, as classify.py does), killed with SIGKILL and resumed, on a
real Dask LocalCluster, and refusing bad input before any work."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import caffe
import numpy as np
import pytest
import zarr
from PIL import Image

import fastsal
from conftest import _input, fc, spearman
from fastsal import cli, jobs
from fastsal._preprocess import Preprocessing, load_image, load_mean

MEAN = [104.0, 117.0, 123.0]


def photo(rng, h, w):
    """A smooth random picture (JPEG-friendly), uint8 RGB."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (5 + 3 * c) + c) + np.cos(y / (7 + c)) for c in range(3)], axis=2)
    return np.clip(127 + 60 * base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Photos of mixed sizes and formats, grayscale, RGBA, 16-bit, and four files that are no images."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    for i in range(14):
        Image.fromarray(photo(rng, 30 + 3 * i, 60 - 2 * i)).save(folder / f"photo{i:02d}.jpg", quality=90)
    sub = folder / "more"
    sub.mkdir()
    Image.fromarray(photo(rng, 48, 48)).save(sub / "rgb.png")
    Image.fromarray(photo(rng, 40, 36)[..., 0]).save(sub / "grey.png")
    Image.fromarray(np.dstack([photo(rng, 36, 40), np.full((36, 40), 200, np.uint8)])).save(sub / "rgba.png")
    Image.fromarray(photo(rng, 34, 34)[..., 1].astype(np.uint16) * 257).save(sub / "sixteen.png")
    good = (folder / "photo00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "notes.png").write_text("this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "README.txt").write_text("not listed: not an image suffix")
    return folder


BAD = {"truncated.jpg", "corrupt.jpg", "notes.png", "empty.jpg"}


def caffe_reference(paths, prototxt, weights, images_dim=(40, 40)):
    """classify.py's pipeline: caffe.io.load_image, resize to images_dim, centre crop, Transformer."""
    net = caffe.Net(prototxt, caffe.TEST, weights=weights)
    transformer = caffe.io.Transformer({"data": (1, 3, 32, 32)})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_channel_swap("data", (2, 1, 0))
    transformer.set_raw_scale("data", 255.0)
    transformer.set_mean("data", np.array(MEAN))
    inputs = []
    for path in paths:
        image = caffe.io.resize_image(caffe.io.load_image(path), images_dim)
        top, left = (images_dim[0] - 32) // 2, (images_dim[1] - 32) // 2
        inputs.append(transformer.preprocess("data", image[top : top + 32, left : left + 32]))
    return net, np.stack(inputs).astype(np.float32)


def run(*args) -> int:
    return cli.main([str(a) for a in args])


def run_args(model, images, out, *extra) -> list[str]:
    """`fastsal run IMAGES --model-def ... --pretrained-model ... -o OUT EXTRA...` as CLI words."""
    prototxt, weights = model
    return [
        "run",
        str(images),
        "--model-def",
        prototxt,
        "--pretrained-model",
        weights,
        "-o",
        str(out),
        *map(str, extra),
    ]


def test_job_matches_the_engine_on_caffes_preprocessing(model, dataset, tmp_path, capsys):
    prototxt, weights = model
    out = tmp_path / "maps.zarr"
    code = run(
        *run_args(model, dataset, out, "--top-k", 2, "--images-dim", "40,40", "--mean-value", "104,117,123"),
        *("--chunk-size", 5, "--overlays", tmp_path / "overlays"),
    )
    assert code == 1  # some images failed
    assert "22 images, 18 ok, 4 failed" in capsys.readouterr().out
    store = zarr.open_group(str(out), mode="r")
    paths = [str(p) for p in store["paths"][:]]
    assert len(paths) == 22  # every file with an image suffix, recursively; not README.txt
    status = store["status"][:]
    names = [Path(p).name for p in paths]
    assert {n for n, s in zip(names, status) if s == jobs.FAILED} == BAD
    assert (status[[n not in BAD for n in names]] == jobs.OK).all()
    good = [p for p, n in zip(paths, names) if n not in BAD]
    net, inputs = caffe_reference(good, prototxt, weights)
    maps, classes = fastsal.compute_top_k(net, inputs, 2)
    rows = [i for i, n in enumerate(names) if n not in BAD]
    np.testing.assert_array_equal(store["classes"][:][rows], classes)
    np.testing.assert_allclose(store["maps"][:][rows], maps, rtol=1e-5, atol=1e-7)
    net.blobs["data"].reshape(*inputs.shape)
    np.testing.assert_allclose(store["scores"][:][rows], net.forward(data=inputs, end="fc")["fc"], rtol=1e-5)
    # the net's own Softmax (Caffe's "prob" output) on the same inputs
    np.testing.assert_allclose(
        store["probabilities"][:][rows], net.forward(data=inputs)["prob"], rtol=1e-4, atol=1e-6
    )
    bad_rows = [i for i, n in enumerate(names) if n in BAD]
    assert np.isnan(store["maps"][:][bad_rows]).all() and (store["classes"][:][bad_rows] == -1).all()
    assert np.isnan(store["probabilities"][:][bad_rows]).all()
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2 * len(good)  # one per image and class
    attributes = store.attrs["fastsal"]
    assert attributes["version"] == fastsal.__version__
    assert attributes["plan"]["preprocessing"]["mean"] == MEAN
    # fastsal status lists the failures with their reasons, and says so in its exit code.
    assert run("status", out) == 1
    text = capsys.readouterr().out
    assert (
        "images: 18 ok, 4 failed, 0 pending" in text and "truncated.jpg" in text and "cannot decode" in text
    )


def test_inexact_job_records_its_mode_and_agrees_in_rank(model, dataset, tmp_path):
    exact, inexact = tmp_path / "exact.zarr", tmp_path / "inexact.zarr"
    common = ("--top-k", 1, "--images-dim", "40,40", "--mean-value", "104,117,123", "--quiet")
    assert run(*run_args(model, dataset, exact, *common)) == 1  # the dataset's 4 broken files
    assert run(*run_args(model, dataset, inexact, *common, "--inexact")) == 1
    assert zarr.open_group(str(exact), mode="r").attrs["fastsal"]["plan"]["exact"] is True
    assert zarr.open_group(str(inexact), mode="r").attrs["fastsal"]["plan"]["exact"] is False
    a, b = arrays(exact), arrays(inexact)
    ok = a["status"] == jobs.OK
    np.testing.assert_array_equal(a["classes"][ok], b["classes"][ok])
    assert all(spearman(m, n) >= 0.99 for m, n in zip(a["maps"][ok], b["maps"][ok]))
    # Resuming with the other mode would mix them in one store: refused.
    assert run(*run_args(model, dataset, inexact, *common)) == 2


def test_preprocessing_matches_caffe_transformer(dataset, tmp_path):
    """Grayscale, RGBA and 16-bit files; a .binaryproto and a .npy mean image; input_scale."""
    mean = np.random.default_rng(0).uniform(90, 130, (3, 32, 32)).astype(np.float32)
    blob = caffe.io.array_to_blobproto(mean[np.newaxis])
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    np.save(tmp_path / "mean.npy", mean)
    for mean_path in (tmp_path / "mean.binaryproto", tmp_path / "mean.npy"):
        loaded = load_mean(mean_path)
        np.testing.assert_array_equal(loaded, mean)
        ours = Preprocessing((3, 32, 32), images_dim=(36, 44), mean=loaded, input_scale=0.5)
        transformer = caffe.io.Transformer({"data": (1, 3, 32, 32)})
        transformer.set_transpose("data", (2, 0, 1))
        transformer.set_channel_swap("data", (2, 1, 0))
        transformer.set_raw_scale("data", 255.0)
        transformer.set_mean("data", mean)
        transformer.set_input_scale("data", 0.5)
        for name in ("more/grey.png", "more/rgba.png", "more/sixteen.png", "photo03.jpg"):
            reference = caffe.io.load_image(str(dataset / name))
            np.testing.assert_array_equal(load_image(dataset / name), reference)
            resized = caffe.io.resize_image(reference, (36, 44))[2:34, 6:38]
            np.testing.assert_allclose(
                ours(reference), transformer.preprocess("data", resized), rtol=1e-6, atol=1e-4
            )
            back = ours.deprocess(ours(reference))
            assert np.abs(back.astype(int) - np.round(resized * 255)).max() <= 1


def test_pycaffe_load_image_works():
    """fastsal's Caffe build fixes caffe.io.load_image for current scikit-image (as_grey was removed)."""
    path = Path(__file__).parent / "_grey_probe.png"
    try:
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
        image = caffe.io.load_image(str(path))
        assert image.shape == (8, 8, 3) and np.isclose(image[0, 1, 0], 1 / 255)
        assert caffe.io.load_image(str(path), color=False).shape == (8, 8, 1)
    finally:
        path.unlink(missing_ok=True)


def arrays(out) -> dict:
    store = zarr.open_group(str(out), mode="r")
    return {name: store[name][:] for name in ("maps", "classes", "scores", "status")}


def assert_same_store(a, b):
    for name, values in arrays(a).items():
        np.testing.assert_array_equal(values, arrays(b)[name], err_msg=name)
    assert (
        zarr.open_group(str(a), mode="r").attrs["fastsal"]
        == zarr.open_group(str(b), mode="r").attrs["fastsal"]
    )


def job_command(dataset, model, out, *extra):
    words = run_args(model, dataset, out, "--mean-value", "104,117,123", "--quiet", *extra)
    return [sys.executable, "-m", "fastsal.cli", *words]


KILLED_JOB = ("--chunk-size", 2, "--method", "integrated_gradients", "--n-steps", 400, "--classes", "1,3")


@pytest.fixture(scope="module")
def uninterrupted(model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "reference.zarr"
    subprocess.run(
        job_command(dataset, model, out, *KILLED_JOB), check=False, capture_output=True, timeout=600
    )
    return out


@pytest.mark.parametrize("kill_after", [1, 3, 6])
def test_resume_after_sigkill_equals_an_uninterrupted_run(
    model, dataset, uninterrupted, tmp_path, kill_after
):
    out = tmp_path / "killed.zarr"
    job = subprocess.Popen(
        job_command(dataset, model, out, *KILLED_JOB), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    markers = out / jobs.MARKERS
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if markers.is_dir() and len(list(markers.glob("chunk-*.json"))) >= kill_after:
            break
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = {p.name: p.stat().st_mtime_ns for p in markers.glob("chunk-*.json")}
    assert kill_after <= len(done) < 11, "the kill should land mid-job"
    assert jobs.status(out)["pending"] > 0
    finished = subprocess.run(
        job_command(dataset, model, out, *KILLED_JOB), capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 1, finished.stderr  # the 4 bad files
    assert re.search(rf"\b{len(done)} chunks? already done", finished.stdout), finished.stdout
    for name, mtime in done.items():  # finished chunks were not redone
        assert (markers / name).stat().st_mtime_ns == mtime
    assert_same_store(out, uninterrupted)


def test_write_error_stops_the_job_and_a_rerun_completes_it(model, dataset, tmp_path, monkeypatch):
    prototxt, weights = model
    options = dict(chunk_size=4, classes=[0, 2], mean_value=MEAN, quiet=True)
    jobs.run_job(dataset, prototxt, weights, tmp_path / "reference.zarr", **options)
    original, calls = jobs._write_marker, []

    def disk_full(output, chunk, summary):
        calls.append(chunk)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        original(output, chunk, summary)

    monkeypatch.setattr(jobs, "_write_marker", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        jobs.run_job(dataset, prototxt, weights, tmp_path / "out.zarr", **options)
    assert 0 < len(jobs.done_chunks(str(tmp_path / "out.zarr"))) < 6
    monkeypatch.setattr(jobs, "_write_marker", original)
    summary = jobs.run_job(dataset, prototxt, weights, tmp_path / "out.zarr", **options)
    assert (summary.ok, summary.failed) == (18, 4)
    assert_same_store(tmp_path / "out.zarr", tmp_path / "reference.zarr")


def test_dask_local_cluster_writes_the_same_store(model, dataset, tmp_path):
    prototxt, weights = model
    options = dict(
        chunk_size=3,
        top_k=1,
        method="smoothgrad",
        method_options={"samples": 4, "seed": 2},
        mean_value=MEAN,
        quiet=True,
    )
    single = jobs.run_job(dataset, prototxt, weights, tmp_path / "single.zarr", **options)
    spread = jobs.run_job(dataset, prototxt, weights, tmp_path / "dask.zarr", workers=2, **options)
    assert (spread.ok, spread.failed) == (single.ok, single.failed) == (18, 4)
    assert_same_store(tmp_path / "dask.zarr", tmp_path / "single.zarr")


def test_npy_inputs(model, tmp_path, rng):
    prototxt, weights = model
    inputs = rng.standard_normal((7, 3, 32, 32)).astype(np.float32) * 40
    inputs[4, 0, 0, 0] = np.nan
    np.save(tmp_path / "inputs.npy", inputs)
    summary = jobs.run_job(
        tmp_path / "inputs.npy", prototxt, weights, tmp_path / "out.zarr", classes=[4], quiet=True
    )
    assert (summary.ok, summary.failed) == (6, 1)
    store = arrays(tmp_path / "out.zarr")
    net = fastsal.load(prototxt, weights)
    keep = [0, 1, 2, 3, 5, 6]
    np.testing.assert_allclose(
        store["maps"][keep], fastsal.compute(net, inputs[keep], [4]), rtol=1e-5, atol=1e-7
    )
    assert store["status"][4] == jobs.FAILED


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: ["--model-def", p / "absent.prototxt"], "model file not found"),
        (lambda p: ["--model-def", p / "broken.prototxt"], "Error parsing text-format|Unknown bottom blob"),
        (lambda p: ["--mean-value", "1,2"], r"mean has shape \(2,\)"),
        (lambda p: ["--mean-file", p / "wrong_mean.npy"], r"mean has shape \(3, 5, 5\)"),
        (lambda p: ["--classes", "2,9"], "class 9 is out of range: the net has 5 classes"),
        (lambda p: ["--top-k", "6"], "top_k must be in 1..5"),
        (lambda p: ["--images-dim", "20,20"], "smaller than the net's input"),
        (lambda p: ["--method", "smoothgrad", "--samples", "0"], "samples must be a positive integer"),
        (lambda p: ["--method", "saliency", "--n-steps", "4"], "takes no option 'n_steps'"),
        (lambda p: ["--reduce", "none"], "jobs write maps"),
        (lambda p: ["-o", p / "not_a_store"], "exists and is not a fastsal store"),
    ],
    ids=[
        "missing-model",
        "broken-model",
        "mean-values",
        "mean-file",
        "classes",
        "top-k",
        "images-dim",
        "samples",
        "option",
        "reduce",
        "not-a-store",
    ],
)
def test_refused_before_any_work(model, dataset, tmp_path, capsys, change, message):
    prototxt, weights = model
    (tmp_path / "broken.prototxt").write_text(_input((3, 32, 32)) + fc("fc", "nowhere", 3))
    np.save(tmp_path / "wrong_mean.npy", np.zeros((3, 5, 5), np.float32))
    (tmp_path / "not_a_store").mkdir()
    (tmp_path / "not_a_store" / "precious.txt").write_text("keep me")
    args = run_args(model, dataset, tmp_path / "out.zarr", "--mean-value", "104,117,123")
    extra = [str(a) for a in change(tmp_path)]
    for flag in ("--model-def", "-o", "--mean-value"):
        if flag in extra and flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    if "--mean-file" in extra:
        i = args.index("--mean-value")
        del args[i : i + 2]
    assert run(*args, *extra) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out.zarr").exists()
    assert (tmp_path / "not_a_store" / "precious.txt").read_text() == "keep me"


def test_other_arguments_on_an_existing_store_are_refused(model, dataset, tmp_path, capsys):
    prototxt, weights = model
    base = run_args(model, dataset, tmp_path / "o.zarr", "--mean-value", "104,117,123", "--quiet")
    assert run(*base, "--classes", "1") == 1
    before = arrays(tmp_path / "o.zarr")
    assert run(*base, "--classes", "2") == 2
    assert "holds a job with other arguments (differing: classes)" in capsys.readouterr().err
    np.testing.assert_array_equal(arrays(tmp_path / "o.zarr")["maps"], before["maps"])
    assert run(*base, "--classes", "2", "--overwrite") == 1
    assert (arrays(tmp_path / "o.zarr")["classes"][arrays(tmp_path / "o.zarr")["status"] == 1] == 2).all()


def test_empty_folder_and_status_of_a_non_store(tmp_path, model, capsys):
    prototxt, weights = model
    (tmp_path / "empty").mkdir()
    assert run(*run_args(model, tmp_path / "empty", tmp_path / "o.zarr")) == 2
    assert "no images found" in capsys.readouterr().err
    assert run("status", tmp_path / "empty") == 2
    assert "is not a fastsal store" in capsys.readouterr().err


def test_run_job_names_a_misspelt_or_misplaced_option(model, dataset, tmp_path):
    """run_job's keywords are the CLI's flags with underscores, method options in method_options: a
    wrong one is refused naming run_job (not an internal function), and a method's option says where
    it goes. Nothing is written."""
    prototxt, weights = model
    out = tmp_path / "out.zarr"
    with pytest.raises(
        TypeError, match=r"run_job\(\) got an unknown option 'mean_vlue'; it takes .*mean_value"
    ):
        jobs.run_job(dataset, prototxt, weights, out, mean_vlue=MEAN)
    with pytest.raises(
        TypeError, match=r"'samples' is an option of the method: method_options=\{'samples': 25\}"
    ):
        jobs.run_job(dataset, prototxt, weights, out, method="smoothgrad", samples=25)
    assert not out.exists()
