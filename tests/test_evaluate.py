"""fastsal evaluate (the store side of fastsal.evaluate) and the integrated_gradients convergence delta
in jobs: real Zarr stores on disk, real photos, real subprocesses killed with SIGKILL. The oracle is
fastsal.evaluate on the same images (decoded by jobs' Preprocessing) and the store's own maps."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_jobs_hardening import cli_run, photos

import fastsal
from conftest import _input, conv, fc, layer, make_net
from fastsal import _evaluate_job, cli, jobs
from fastsal._preprocess import Preprocessing, decode_image
from fastsal.metrics import MPRT, Deletion

METRICS = "deletion,insertion,mprt"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("images"), 7)  # and one broken file: a failed image


def inputs_of(out) -> tuple[np.ndarray, np.ndarray]:
    """The store's OK images decoded from their files with the plan's preprocessing, and their indices."""
    group = zarr.open_group(str(out), mode="r")
    plan = group.attrs["fastsal"]["plan"]["preprocessing"]
    preprocessing = Preprocessing(
        tuple(plan["input_shape"]),
        images_dim=None if plan["images_dim"] is None else tuple(plan["images_dim"]),
        mean=np.asarray(plan["mean"], np.float32),
        raw_scale=plan["raw_scale"],
        channel_swap=tuple(plan["channel_swap"]),
        input_scale=plan["input_scale"],
    )
    ok = np.flatnonzero(group["status"][:] == jobs.OK)
    paths = group["paths"][:]
    decoded = [preprocessing(decode_image(Path(paths[i]).read_bytes(), color=True)) for i in ok]
    return np.stack(decoded), ok


def metric_arrays(out) -> dict:
    group = zarr.open_group(str(out), mode="r")["metrics"]
    return {name: group[name][:] for name in group.array_keys()}


def cli_evaluate(out, *extra, script=None) -> subprocess.CompletedProcess:
    words = ["evaluate", str(out), "--metrics", METRICS, "--quiet", *map(str, extra)]
    command = ["-c", script] if script else ["-m", "fastsal.cli"]
    return subprocess.run([sys.executable, *command, *words], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def evaluated(model, images, tmp_path_factory):
    """A store of two top classes per image, evaluated without interruption."""
    out = tmp_path_factory.mktemp("evaluated") / "maps.zarr"
    assert cli_run(model, images, out, "--chunk-size", 3, "--top-k", 2).returncode == 1  # the broken file
    done = cli_evaluate(out)
    assert done.returncode == 0, done.stderr
    return out


def test_metrics_in_the_store_equal_fastsal_evaluate(model, evaluated):
    found = metric_arrays(evaluated)
    group = zarr.open_group(str(evaluated), mode="r")
    images, ok = inputs_of(evaluated)
    classes, maps = group["classes"][:][ok], group["maps"][:][ok]
    net = fastsal.load(*model)
    reference = fastsal.evaluate(net, images, classes, ["deletion", "insertion"], method=None, maps=maps)
    reference |= fastsal.evaluate(net, images, classes, ["mprt"], method="saliency")
    for name in ("deletion", "insertion", "deletion_curve", "insertion_curve", "mprt", "mprt_spearman_abs"):
        assert found[name].shape[:2] == (8, 2), name
        np.testing.assert_allclose(found[name][ok], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
        failed = np.setdiff1d(np.arange(8), ok)
        assert np.isnan(found[name][failed]).all(), name  # the broken file has no scores
    # xarray sees the new arrays through the consolidated metadata, with their dimension names
    xarray = pytest.importorskip("xarray")
    dataset = xarray.open_zarr(str(evaluated), group="metrics")
    assert dataset["deletion"].dims == ("image", "class")
    np.testing.assert_array_equal(dataset["insertion_curve"].values, found["insertion_curve"])


def test_status_shows_each_metric(evaluated, capsys):
    assert cli.main(["status", str(evaluated)]) == 1  # the broken file
    shown = capsys.readouterr().out
    for name, values in metric_arrays(evaluated).items():
        if values.ndim != 2:
            continue
        finite = values[np.isfinite(values)]
        q1, q3 = np.percentile(finite, [25, 75])
        assert (
            f"metric {name}: {finite.size} evaluated, mean {finite.mean():.4g}, "
            f"quartiles {q1:.4g} / {np.median(finite):.4g} / {q3:.4g}"
        ) in shown


@pytest.mark.parametrize("die_at", ["array", "marker"])
def test_sigkill_mid_evaluation_then_a_rerun_finishes(model, images, evaluated, tmp_path, die_at):
    """Killed in the second chunk (while writing its arrays, or after its first marker): the same
    command finishes, and the store equals an uninterrupted evaluation."""
    out = tmp_path / "maps.zarr"
    assert cli_run(model, images, out, "--chunk-size", 3, "--top-k", 2).returncode == 1
    target = "zarr.Array.__setitem__" if die_at == "array" else "_evaluate_job._write_marker"
    # the array case: at chunk 1's fourth array write; the marker case: after chunk 1's first marker
    after = 9 + 4 if die_at == "array" else 3 + 2
    killer = textwrap.dedent(
        f"""
        import os, signal, sys, zarr
        from fastsal import _evaluate_job, cli
        calls = [0]
        owner, name = {target!r}.rsplit(".", 1)
        owner = {{"zarr.Array": zarr.Array, "_evaluate_job": _evaluate_job}}[owner]
        original = getattr(owner, name)
        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == {after}:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(owner, name, dying)
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    killed = cli_evaluate(out, script=killer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    markers = sorted(p.name for p in (out / jobs.MARKERS).glob("metrics-*.json"))
    assert len(markers) == (3 if die_at == "array" else 4)  # chunk 0 finished (and one metric of chunk 1)
    rerun = cli_evaluate(out)
    assert rerun.returncode == 0, rerun.stderr
    assert "evaluated" in rerun.stdout
    found, reference = metric_arrays(out), metric_arrays(evaluated)
    assert sorted(found) == sorted(reference)
    for name in reference:  # a chunk resumed with fewer metrics batches its forwards otherwise: float order
        np.testing.assert_allclose(found[name], reference[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_refusals(model, images, tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "none.zarr"), "--metrics", "deletion"]) == 2
    assert "no such store" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert cli.main(["evaluate", str(tmp_path / "other"), "--metrics", "deletion"]) == 2
    assert "is not a fastsal store" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tmp_path / "other"), "--metrics", "nonsense"])
    # a model file changed since the run
    folder = tmp_path / "model"
    folder.mkdir()
    prototxt, weights = (shutil.copy(path, folder) for path in model)
    out = tmp_path / "maps.zarr"
    assert cli_run((prototxt, weights), images, out, "--chunk-size", 4).returncode == 1
    net = fastsal.load(prototxt, weights)
    net.params["fc"][0].data[...] *= 2
    net.save(weights)
    assert cli.main(["evaluate", str(out), "--metrics", "deletion", "--quiet"]) == 2
    assert "changed since the maps were made" in capsys.readouterr().err
    assert not (out / "metrics").exists()


def test_other_settings_are_refused_unless_overwrite(model, images, tmp_path):
    out = tmp_path / "maps.zarr"
    assert cli_run(model, images, out, "--chunk-size", 4).returncode == 1
    _evaluate_job.evaluate_store(out, ["deletion", "insertion"], quiet=True)
    before = metric_arrays(out)
    maps = zarr.open_group(str(out), mode="r")["maps"][:]
    with pytest.raises(
        jobs.JobError,
        match=r"deletion with other settings \(deletion.step 7 asked, default stored\); give --overwrite",
    ):
        _evaluate_job.evaluate_store(out, [Deletion(step=7)], quiet=True)
    assert all(np.array_equal(metric_arrays(out)[k], v, equal_nan=True) for k, v in before.items())
    _evaluate_job.evaluate_store(out, [Deletion(step=7)], overwrite=True, quiet=True)
    after = metric_arrays(out)
    assert after["deletion_curve"].shape[2] != before["deletion_curve"].shape[2]  # 32x32 / 7 steps
    np.testing.assert_array_equal(after["insertion_curve"], before["insertion_curve"])  # untouched
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["maps"][:], maps)
    # a store with metrics is still fastsal's alone: fastsal run --overwrite replaces it
    assert cli_run(model, images, out, "--chunk-size", 4, "--overwrite").returncode == 1
    assert not (out / "metrics").exists()


def test_overwrite_leaves_an_array_the_user_put_beside_the_metric(model, images, tmp_path):
    """--overwrite replaces the arrays the metric wrote, not one the user named after it."""
    out = tmp_path / "maps.zarr"
    assert cli_run(model, images, out, "--chunk-size", 4).returncode == 1
    _evaluate_job.evaluate_store(out, ["deletion"], quiet=True)
    mine = np.arange(8, dtype=np.float32).reshape(4, 2)
    zarr.open_group(str(out), mode="r+").create_array("metrics/deletion_mine", data=mine)
    _evaluate_job.evaluate_store(out, [Deletion(step=7)], overwrite=True, quiet=True)
    found = metric_arrays(out)
    np.testing.assert_array_equal(found["deletion_mine"], mine)
    assert found["deletion_curve"].shape[2] == -(-32 * 32 // 7) + 1  # the metric's own: replaced


def test_run_evaluate_after_the_run(model, images, evaluated, tmp_path):
    out = tmp_path / "maps.zarr"
    done = cli_run(model, images, out, "--chunk-size", 3, "--top-k", 2, "--evaluate", METRICS)
    assert done.returncode == 1, done.stderr  # the broken file, as the run says
    found, reference = metric_arrays(out), metric_arrays(evaluated)
    for name in reference:
        np.testing.assert_array_equal(found[name], reference[name], err_msg=name)


def test_metric_options_reach_the_metrics_and_the_plan(model, evaluated, tmp_path):
    """--metric-option sets a metric's own keyword: the store holds what fastsal.evaluate gives with
    those objects, records the settings, and a rerun with other settings is refused without --overwrite."""
    out = tmp_path / "maps.zarr"
    shutil.copytree(evaluated, out)
    options = ["--metric-option", "deletion.step=448", "--metric-option", "mprt.similarities=spearman,ssim"]
    refused = cli_evaluate(out, *options)
    assert refused.returncode == 2 and "other settings" in refused.stderr  # the store holds the defaults
    done = cli_evaluate(out, *options, "--overwrite")
    assert done.returncode == 0, done.stderr
    found = metric_arrays(out)
    group = zarr.open_group(str(out), mode="r")
    images, ok = inputs_of(out)
    classes, maps = group["classes"][:][ok], group["maps"][:][ok]
    net = fastsal.load(*model)
    reference = fastsal.evaluate(net, images, classes, [Deletion(step=448)], method=None, maps=maps)
    reference |= fastsal.evaluate(net, images, classes, [MPRT(similarities=["spearman", "ssim"])])
    assert found["deletion_curve"].shape[2] == reference["deletion_curve"].shape[2] == 32 * 32 // 448 + 2
    for name in ("deletion", "deletion_curve", "mprt", "mprt_spearman", "mprt_ssim"):
        np.testing.assert_allclose(found[name][ok], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert "mprt_hog" not in found and "mprt_spearman_abs" not in found
    settings = group["metrics"].attrs[_evaluate_job.SETTINGS]
    assert settings["deletion"]["step"] == 448 and settings["mprt"]["similarities"] == ["spearman", "ssim"]
    np.testing.assert_array_equal(found["insertion"], metric_arrays(evaluated)["insertion"])  # untouched
    shown = subprocess.run(
        [sys.executable, "-m", "fastsal.cli", "status", str(out)], capture_output=True, text=True, timeout=600
    ).stdout
    assert "metric deletion (step=448): " in shown  # what differs from the metric's defaults
    assert 'metric mprt (similarities=["spearman", "ssim"]): ' in shown
    assert "metric insertion: " in shown  # defaults: nothing to say


@pytest.mark.parametrize(
    "option, message",
    [
        ("deletion.steps=4", "deletion takes step, baseline, softmax"),
        ("mprt.similarities=pearson", "similarities must name some of"),
        ("deletion.step=-1", "--metric-option deletion.step: step"),
        ("mprt.final_only=maybe", "--metric-option mprt.final_only: final_only must be"),
        ("insertion.step=4", "insertion is not among the metrics"),
        ("nosuch.step=4", "unknown metric 'nosuch'"),
        ("deletion=4", "expected METRIC.OPTION=VALUE"),
    ],
)
def test_a_bad_metric_option_is_refused_before_any_work(evaluated, tmp_path, option, message):
    out = tmp_path / "maps.zarr"
    shutil.copytree(evaluated, out)
    before = metric_arrays(out)
    done = subprocess.run(
        [sys.executable, "-m", "fastsal.cli", "evaluate", str(out), "--metrics", "deletion,mprt"]
        + ["--metric-option", option, "--overwrite", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    after = metric_arrays(out)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize(
    "text, value",
    [
        ("deletion.baseline=[[1, 2], [3, 4]]", [[1, 2], [3, 4]]),  # JSON with commas is one value
        ("road_morf.percentages=[10,50]", [10, 50]),
        ("road_morf.percentages=10,50", [10, 50]),
        ("mprt.layers=conv1", "conv1"),
        ("mprt.layers=a=b", "a=b"),
        ('mprt.layers="a,b"', "a,b"),
        ("mprt.final_only=true", True),
        ("mprt.final_only=True", True),  # Python's spelling as well as JSON's
        ("mprt.final_only=False", False),
        ("mprt.layers=True,b", [True, "b"]),
    ],
)
def test_a_metric_option_s_value(text, value):
    assert cli._metric_option(text)[2] == value


def test_settings_of_a_metric_that_failed_before_writing_do_not_block_a_rerun(evaluated, tmp_path):
    """A setting the metric's class takes but the evaluation refuses (a baseline of the wrong shape)
    records nothing the store holds: a rerun with other settings needs no --overwrite."""
    out = tmp_path / "maps.zarr"
    shutil.copytree(evaluated, out)
    before = metric_arrays(out)
    bad = ["--metrics", "deletion", "--metric-option", "deletion.baseline=[[1]]"]
    failed = cli_evaluate(out, *bad, "--overwrite")
    assert failed.returncode == 2 and "baseline must be" in failed.stderr, failed.stderr
    assert not any(name.startswith("deletion") for name in metric_arrays(out))  # --overwrite removed it
    done = cli_evaluate(out, "--metrics", "deletion", "--metric-option", "deletion.step=448")
    assert done.returncode == 0, done.stderr
    after = metric_arrays(out)
    assert after["deletion_curve"].shape[2] == 32 * 32 // 448 + 2
    assert np.isfinite(after["deletion"]).sum() == np.isfinite(before["deletion"]).sum()
    for name in ("insertion", "mprt"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_run_refuses_a_metric_option_without_evaluate(model, images, tmp_path):
    out = tmp_path / "maps.zarr"
    done = cli_run(model, images, out, "--metric-option", "deletion.step=448")
    assert done.returncode == 2 and "give --evaluate too" in done.stderr
    assert not out.exists()
    done = cli_run(model, images, out, "--evaluate", "deletion", "--metric-option", "deletion.stp=4")
    assert done.returncode == 2 and "deletion takes step" in done.stderr
    assert not out.exists()  # refused before the run


# A TanH net saturates: integrated gradients with few steps misses most of F(x) - F(baseline).
TANH_NET = (
    _input((3, 32, 32), batch=1)
    + conv("conv1", "data", 4)
    + layer("tanh1", "TanH", "conv1", "conv1")
    + fc("fc", "conv1", 3)
    + layer("prob", "Softmax", "fc")
)


@pytest.fixture(scope="module")
def tanh_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tanh")
    net = make_net(folder, TANH_NET, seed=3)
    for blob in net.params["conv1"]:
        blob.data[...] *= 0.05
    net.save(str(folder / "net.caffemodel"))
    return str(folder / "net.prototxt"), str(folder / "net.caffemodel")


def ig_run(model, images, out, n_steps, *extra):
    return cli_run(model, images, out, "--method", "integrated_gradients", "--n-steps", n_steps, *extra)


def test_integrated_gradients_stores_its_delta_and_warns(tanh_model, images, tmp_path, capsys):
    out = tmp_path / "ig.zarr"
    done = ig_run(tanh_model, images, out, 2, "--chunk-size", 3)
    assert done.returncode == 1, done.stderr
    group = zarr.open_group(str(out), mode="r")
    delta = group["convergence_delta"][:]
    inputs, ok = inputs_of(out)
    reference = fastsal.evaluate(
        fastsal.load(*tanh_model),
        inputs,
        group["classes"][:][ok],
        [],
        method="integrated_gradients",
        convergence_delta=True,
        n_steps=2,
    )["convergence_delta"]
    np.testing.assert_allclose(delta[ok], reference, rtol=1e-4)
    assert np.isnan(np.delete(delta, ok)).all()
    median = np.median(reference)
    assert median > 0.05
    measured = group["convergence_delta"].attrs["measured"]
    assert measured["median"] <= 0.05 and measured["n_steps"] > 2
    warning = f"median is {median:.1%}"
    assert warning in done.stderr and f"--n-steps {measured['n_steps']} brings it" in done.stderr
    assert "measured on 4 images" in done.stderr
    # the count is right: the delta of those images at that count (the oracle again) is under 5%
    chosen = [list(ok).index(i) for i in measured["images"]]
    again = fastsal.evaluate(
        fastsal.load(*tanh_model),
        inputs[chosen],
        group["classes"][:][measured["images"]],
        [],
        method="integrated_gradients",
        convergence_delta=True,
        n_steps=measured["n_steps"],
    )["convergence_delta"]
    assert np.median(again) == pytest.approx(measured["median"], rel=1e-4)
    assert np.median(again) <= 0.05 < np.median(reference[chosen])
    assert cli.main(["status", str(out)]) == 1
    shown = capsys.readouterr()
    assert f"median {median:.2%}" in shown.out and warning in shown.err


def test_no_warning_when_converged(tanh_model, images, tmp_path, capsys):
    out = tmp_path / "ig.zarr"
    done = ig_run(tanh_model, images, out, 64)
    assert done.returncode == 1, done.stderr
    assert np.nanmedian(zarr.open_group(str(out), mode="r")["convergence_delta"][:]) <= 0.05
    assert "convergence delta" not in done.stderr
    assert cli.main(["status", str(out)]) == 1
    shown = capsys.readouterr()
    assert "convergence delta (integrated_gradients): median" in shown.out
    assert "not converged" not in shown.err


def test_an_older_integrated_gradients_store_resumes_without_the_delta(tanh_model, images, tmp_path, capsys):
    """A store from before the delta was stored: no array, no plan key; one chunk still to do."""
    out = tmp_path / "ig.zarr"
    assert ig_run(tanh_model, images, out, 8, "--chunk-size", 3).returncode == 1
    shutil.rmtree(out / "convergence_delta")
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["fastsal"]["plan"]["convergence_delta"]
    meta["consolidated_metadata"]["metadata"].pop("convergence_delta")
    (out / "zarr.json").write_text(json.dumps(meta))
    (out / jobs.MARKERS / "chunk-000001.json").unlink()
    resumed = ig_run(tanh_model, images, out, 8, "--chunk-size", 3)
    assert resumed.returncode == 1, resumed.stderr
    assert "1 chunk already done" not in resumed.stdout and "2 chunks already done" in resumed.stdout
    assert not (out / "convergence_delta").exists()
    assert cli.main(["status", str(out)]) == 1
    assert "convergence delta" not in capsys.readouterr().out


def test_a_store_without_its_arguments_is_refused_until_its_run_is_resumed(model, images, tmp_path, capsys):
    """A store from before the run's arguments were recorded: refused, and a plain rerun records them."""
    out = tmp_path / "maps.zarr"
    assert cli_run(model, images, out, "--chunk-size", 4).returncode == 1
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["fastsal"]["arguments"]
    del meta["consolidated_metadata"]
    (out / "zarr.json").write_text(json.dumps(meta))
    assert cli.main(["evaluate", str(out), "--metrics", "deletion", "--quiet"]) == 2
    assert "does not record its run's arguments" in capsys.readouterr().err
    resumed = cli_run(model, images, out, "--chunk-size", 4)
    assert resumed.returncode == 1 and "already done" in resumed.stdout, resumed.stderr
    assert cli.main(["evaluate", str(out), "--metrics", "deletion", "--quiet"]) == 0
    assert np.isfinite(metric_arrays(out)["deletion"]).sum() == 7  # the seven photos, not the broken file
