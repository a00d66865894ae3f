"""fastsal export over real stores on disk: overlays, maps and the table out of a finished (or
unfinished, or older) store, through the CLI; nothing it did not write is ever overwritten."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from test_jobs import photo, run, run_args

from conftest import _input, conv, fc, layer, make_net
from fastsal import jobs
from fastsal._export import csv_header

MEAN = ("--mean-value", "104,117,123")


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory):
    """A finished store of 4 photos (one broken file), top-2 classes, and its labels file."""
    root = tmp_path_factory.mktemp("finished")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(8)
    for i, (h, w) in enumerate([(40, 90), (70, 40), (45, 45), (36, 120)]):
        Image.fromarray(photo(rng, h, w)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_text("no picture")
    labels = root / "synset_words.txt"
    labels.write_text("".join(f"n0{i}000000 thing {i}, other name\n" for i in range(5)))
    out = root / "maps.zarr"
    assert run(*run_args(model, folder, out, "--top-k", 2, *MEAN, "--quiet", "--chunk-size", 3)) == 1
    return out, labels


def test_export_writes_overlays_maps_and_the_table(finished, tmp_path, capsys):
    out, labels = finished
    png, npy, table = tmp_path / "png", tmp_path / "npy", tmp_path / "results.csv"
    code = run("export", out, "--png", png, "--npy", npy, "--csv", table, "--labels", labels, "--quiet")
    assert code == 0
    assert "8 overlays" in capsys.readouterr().out
    store = zarr.open_group(str(out), mode="r")
    paths, status = [str(p) for p in store["paths"][:]], store["status"][:]
    classes, scores, probabilities = store["classes"][:], store["scores"][:], store["probabilities"][:]
    ok = np.flatnonzero(status == jobs.OK)
    assert len(ok) == 4 and len(list(png.glob("*.png"))) == 8
    for index in ok:
        stem = Path(paths[index]).stem
        for class_id in classes[index]:
            assert (png / jobs.overlay_name(index, stem, int(class_id))).is_file()
        np.testing.assert_array_equal(np.load(npy / f"{index:06d}_{stem}.npy"), store["maps"][index])
    assert len(list(npy.glob("*.npy"))) == 4
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert [r["path"] for r in rows] == paths
    for index, row in enumerate(rows):
        if status[index] != jobs.OK:
            assert row["status"] == "failed" and "cannot decode" in row["reason"] and row["class_1"] == ""
            continue
        assert row["status"] == "ok" and row["reason"] == ""
        for k in (1, 2):
            class_id = int(classes[index, k - 1])
            assert int(row[f"class_{k}"]) == class_id and row[f"name_{k}"] == f"thing {class_id}, other name"
            assert float(row[f"score_{k}"]) == pytest.approx(scores[index, class_id], rel=1e-5)
            assert float(row[f"probability_{k}"]) == pytest.approx(probabilities[index, class_id], rel=1e-5)
    # the probabilities are the softmax of the scores, row by row (NumPy's formula)
    e = np.exp(scores[ok] - scores[ok].max(axis=1, keepdims=True))
    np.testing.assert_allclose(probabilities[ok], e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    # a second export into the same places is fastsal's own: it replaces them
    assert run("export", out, "--png", png, "--npy", npy, "--csv", table, "--quiet") == 0


def test_export_never_overwrites_what_it_did_not_write(finished, tmp_path, capsys):
    out, _ = finished
    pictures = tmp_path / "holiday"
    pictures.mkdir()
    (pictures / "beach.png").write_bytes(b"precious")
    table = tmp_path / "budget.csv"
    table.write_text("month,amount\njan,3\n")
    assert run("export", out, "--png", pictures, "--quiet") == 2
    assert "did not write" in capsys.readouterr().err
    assert run("export", out, "--npy", pictures) == 2
    assert run("export", out, "--csv", table) == 2
    assert "overwrites nothing it did not write" in capsys.readouterr().err
    assert sorted(p.name for p in pictures.iterdir()) == ["beach.png"]
    assert (pictures / "beach.png").read_bytes() == b"precious"
    assert table.read_text() == "month,amount\njan,3\n"
    # refused before anything is written: a good --png beside a bad --csv writes no overlays
    assert run("export", out, "--png", tmp_path / "new", "--csv", table) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "words, message",
    [
        ((), "give --png DIR, --npy DIR or --csv FILE"),
        (("--csv", "{tmp}/t.csv", "--labels", "{tmp}/three.txt"), "names 3 classes; the net has 5"),
        (("--png", "{tmp}/p", "--alpha", "2"), "alpha must be in [0, 1]"),
        (("--png", "{tmp}/p", "--cmap", "no_such_map"), "unknown colour map"),
    ],
    ids=["nothing", "labels", "alpha", "cmap"],
)
def test_export_refuses_bad_options(finished, tmp_path, capsys, words, message):
    out, _ = finished
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert run("export", out, *[w.format(tmp=tmp_path) for w in words]) == 2
    assert message in capsys.readouterr().err


def test_export_refuses_what_is_no_store(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert run("export", tmp_path / "folder", "--csv", tmp_path / "t.csv") == 2
    assert "is not a fastsal store" in capsys.readouterr().err
    assert run("export", tmp_path / "missing.zarr", "--csv", tmp_path / "t.csv") == 2
    assert not (tmp_path / "t.csv").exists()


def test_a_store_from_before_probabilities_resumes_and_exports(model, finished, tmp_path):
    """An older store (no probabilities array, no such key in its plan) resumes as it was made, and
    export writes its table with the probabilities left empty."""
    out = tmp_path / "old.zarr"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "probabilities")
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["fastsal"]["plan"].pop("probabilities")
    meta["consolidated_metadata"]["metadata"].pop("probabilities")
    (out / "zarr.json").write_text(json.dumps(meta))
    (out / ".fastsal" / "chunk-000001.json").unlink()  # a chunk left to do
    folder = Path(str(zarr.open_group(str(out), mode="r")["paths"][0])).parent
    assert run(*run_args(model, folder, out, "--top-k", 2, *MEAN, "--quiet", "--chunk-size", 3)) == 1
    assert "probabilities" not in zarr.open_group(str(out), mode="r")
    assert run("status", out) == 1
    assert run("export", out, "--csv", tmp_path / "t.csv", "--quiet") == 0
    rows = list(csv.DictReader((tmp_path / "t.csv").read_text().splitlines()))
    assert [r["status"] for r in rows].count("ok") == 4
    assert all(r["probability_1"] == "" for r in rows) and all(
        r["score_1"] != "" for r in rows if r["status"] == "ok"
    )


def test_a_net_without_softmax_stores_no_probabilities(tmp_path):
    text = _input((3, 16, 16), batch=1) + conv("conv1", "data", 4) + layer("relu", "ReLU", "conv1", "conv1")
    net = make_net(tmp_path, text + fc("fc", "conv1", 3), seed=2)
    net.save(str(tmp_path / "net.caffemodel"))
    Image.fromarray(photo(np.random.default_rng(1), 20, 30)).save(tmp_path / "a.png")
    model = (str(tmp_path / "net.prototxt"), str(tmp_path / "net.caffemodel"))
    out = tmp_path / "maps.zarr"
    assert run(*run_args(model, tmp_path / "a.png", out, *MEAN, "--quiet")) == 0
    store = zarr.open_group(str(out), mode="r")
    assert "probabilities" not in store and "probabilities" not in store.attrs["fastsal"]["plan"]
    assert run("export", out, "--csv", tmp_path / "t.csv", "--png", tmp_path / "png", "--quiet") == 0
    assert next(csv.reader((tmp_path / "t.csv").read_text().splitlines())) == csv_header(1)
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


def test_export_of_an_unfinished_store_lists_pending_images(finished, tmp_path, capsys):
    out = tmp_path / "part.zarr"
    shutil.copytree(finished[0], out)
    (out / ".fastsal" / "chunk-000000.json").unlink()  # its data is there, but no longer claimed
    assert run("export", out, "--csv", tmp_path / "t.csv", "--png", tmp_path / "png", "--quiet") == 0
    assert "3 images pending: rerun fastsal run to finish" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "t.csv").read_text().splitlines()))
    assert [r["status"] for r in rows[:3]] == ["pending"] * 3 and all(r["class_1"] == "" for r in rows[:3])
    assert all(p.name[:6] not in ("000000", "000001", "000002") for p in (tmp_path / "png").glob("*.png"))
    assert len(list((tmp_path / "png").glob("*.png"))) == 2 * [r["status"] for r in rows].count("ok")
