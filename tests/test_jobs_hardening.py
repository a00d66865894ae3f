"""The jobs layer's promises, tried as a hostile user would: nothing fastsal does deletes or overwrites
anything that is not its own store, a store never claims maps it does not hold, and an interrupted job
always finishes on a plain rerun. Real files, a real Zarr store, a real Dask scheduler, real signals.
Each test here failed on the jobs layer before this hardening."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from test_jobs import MEAN, arrays, assert_same_store, photo, run, run_args

import fastsal
from fastsal import cli, jobs
from fastsal._preprocess import Preprocessing, load_image
from fastsal._threads import default_threads

TESTS = Path(__file__).resolve().parent


def photos(folder: Path, count: int, seed: int = 5, bad: bool = True) -> Path:
    """count smooth random photos of mixed sizes (and one file that is no image)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(photo(rng, 34 + 3 * i, 50 - 2 * i)).save(folder / f"photo{i:02d}.png")
    if bad:
        (folder / "broken.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("images"), 7)


def cli_run(model, images, out, *extra, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    words = run_args(model, images, out, "--mean-value", "104,117,123", "--quiet", *extra)
    return subprocess.run(
        [sys.executable, "-m", "fastsal.cli", *words],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def quick(model, images, out, *extra) -> int:
    return run(*run_args(model, images, out, "--mean-value", "104,117,123", "--quiet", *extra))


# ---- nothing but its own store is ever deleted or overwritten ----


def test_overwrite_refuses_a_folder_that_is_not_a_store(model, images, tmp_path, capsys):
    documents = tmp_path / "my_documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    assert quick(model, images, documents, "--overwrite") == 2
    assert "is not a fastsal store" in capsys.readouterr().err
    assert (documents / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in documents.iterdir()) == ["thesis.txt"]


@pytest.mark.parametrize("where", ["my_notes.txt", "maps/my_notes.txt", ".fastsal/keep/me.txt"])
def test_overwrite_refuses_a_store_holding_files_fastsal_did_not_write(
    model, images, tmp_path, capsys, where
):
    out = tmp_path / "maps.zarr"
    assert quick(model, images, out, "--classes", "1") == 1
    (out / where).parent.mkdir(parents=True, exist_ok=True)
    (out / where).write_text("keep me")
    assert quick(model, images, out, "--classes", "2", "--overwrite") == 2
    assert where in capsys.readouterr().err
    assert (out / where).read_text() == "keep me"
    assert (arrays(out)["classes"][arrays(out)["status"] == jobs.OK] == 1).all()  # the old store is intact


def test_output_under_a_file_is_refused(model, images, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert quick(model, images, tmp_path / "afile" / "sub" / "maps.zarr") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"


def test_output_that_is_a_file_is_refused(model, images, tmp_path, capsys):
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    assert quick(model, images, target) == 2
    assert quick(model, images, target, "--overwrite") == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "a,b\n1,2\n"


def test_overwrite_recomputes_a_store_with_the_same_plan(model, images, tmp_path):
    out = tmp_path / "maps.zarr"
    assert quick(model, images, out, "--chunk-size", 3) == 1
    reference = arrays(out)
    store = zarr.open_group(str(out), mode="r+")
    store["maps"][:3] = 0.0  # what a recompute must replace
    assert quick(model, images, out, "--chunk-size", 3, "--overwrite") == 1
    np.testing.assert_array_equal(arrays(out)["maps"], reference["maps"])
    assert not [p for p in tmp_path.iterdir() if p.name != "maps.zarr"], "no leftovers beside the store"


def test_a_store_in_use_by_another_job_is_refused(model, images, tmp_path, capsys):
    """While a job holds a store (its lock, as a running job does), another job on it is refused; once
    the lock is gone (the job ended or was killed), the store resumes."""
    out = tmp_path / "maps.zarr"
    assert quick(model, images, out, "--chunk-size", 3) == 1
    (out / jobs.MARKERS / "chunk-000001.json").unlink()
    holder = jobs._lock(out)
    try:
        for extra in ((), ("--overwrite",)):
            assert quick(model, images, out, "--chunk-size", 3, *extra) == 2
            assert f"another fastsal job (pid {os.getpid()}) is writing" in capsys.readouterr().err
    finally:
        holder.close()
    assert jobs.status(out)["chunks_done"] == 2  # the refused jobs changed nothing
    assert quick(model, images, out, "--chunk-size", 3) == 1
    assert jobs.status(out)["pending"] == 0


# ---- a store never claims maps it does not hold ----


def test_the_same_relative_argument_from_another_directory_is_another_job(model, tmp_path, capsys):
    photos(tmp_path / "a" / "photos", 3, seed=1, bad=False)
    photos(tmp_path / "b" / "photos", 3, seed=2, bad=False)
    out = tmp_path / "maps.zarr"
    first = cli_run(model, "photos", out, cwd=tmp_path / "a")
    assert first.returncode == 0, first.stderr
    paths = [str(p) for p in zarr.open_group(str(out), mode="r")["paths"][:]]
    assert paths == [str(tmp_path / "a" / "photos" / f"photo{i:02d}.png") for i in range(3)]
    second = cli_run(model, "photos", out, cwd=tmp_path / "b")
    assert second.returncode == 2
    assert "differing: inputs" in second.stderr


def test_a_changed_file_is_recomputed_on_resume(model, tmp_path):
    folder = photos(tmp_path / "photos", 5, bad=False)
    out = tmp_path / "maps.zarr"
    assert quick(model, folder, out, "--chunk-size", 2) == 0
    done = {c: s for c, s in jobs.done_chunks(str(out)).items()}
    rng = np.random.default_rng(99)
    Image.fromarray(photo(rng, 40, 40)[::-1]).save(folder / "photo03.png")  # chunk 1
    assert quick(model, folder, out, "--chunk-size", 2) == 0
    assert quick(model, folder, tmp_path / "fresh.zarr", "--chunk-size", 2) == 0
    assert_same_store(out, tmp_path / "fresh.zarr")
    after = jobs.done_chunks(str(out))
    assert after[0] == done[0] and after[2] == done[2]


@pytest.mark.parametrize("die_at", ["maps", "scores", "paths"])
def test_sigkill_while_the_store_is_created(model, images, tmp_path, die_at):
    """Killed between creating the plan and the arrays: a plain rerun finishes with the whole store."""
    killer = textwrap.dedent(
        f"""
        import os, signal, sys, zarr
        from fastsal import cli
        original = zarr.Group.create_array
        def dying(self, name, *args, **kwargs):
            if name == {die_at!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, name, *args, **kwargs)
        zarr.Group.create_array = dying
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    out = tmp_path / "maps.zarr"
    words = run_args(model, images, out, "--mean-value", "104,117,123", "--quiet", "--chunk-size", 3)
    killed = subprocess.run([sys.executable, "-c", killer, *words], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    rerun = cli_run(model, images, out, "--chunk-size", 3)
    assert rerun.returncode == 1, rerun.stderr  # the broken file
    assert jobs.status(out)["pending"] == 0
    assert quick(model, images, tmp_path / "reference.zarr", "--chunk-size", 3) == 1
    assert_same_store(out, tmp_path / "reference.zarr")
    assert len(zarr.open_group(str(out), mode="r")["paths"][:]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.zarr", "reference.zarr"]


def test_a_damaged_marker_means_the_chunk_is_done_again(model, images, tmp_path):
    out = tmp_path / "maps.zarr"
    assert quick(model, images, out, "--chunk-size", 3) == 1
    reference = arrays(out)
    markers = sorted((out / jobs.MARKERS).glob("chunk-*.json"))
    markers[1].write_text("")  # a marker cut short from outside
    (out / jobs.MARKERS / "chunk-000099.json").write_text(markers[0].read_text())  # no such chunk
    assert jobs.status(out)["chunks_done"] == 2
    assert run("status", out) == 3
    assert quick(model, images, out, "--chunk-size", 3) == 1
    assert jobs.status(out)["chunks_done"] == 3
    np.testing.assert_array_equal(arrays(out)["maps"], reference["maps"])


def test_resume_checks_the_arrays(model, images, tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    assert quick(model, images, out, "--chunk-size", 3) == 1
    import shutil

    shutil.rmtree(out / "scores")  # damage from outside
    assert quick(model, images, out, "--chunk-size", 3) == 2
    assert "scores" in capsys.readouterr().err


def test_an_overlay_for_a_long_file_name(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    name = "x" * 245 + ".png"  # 249 bytes: legal
    Image.fromarray(photo(np.random.default_rng(3), 40, 40)).save(folder / name)
    assert quick(model, folder, tmp_path / "maps.zarr", "--overlays", tmp_path / "overlays") == 0
    written = list((tmp_path / "overlays").glob("*.png"))
    assert len(written) == 1 and len(written[0].name.encode()) <= 255


def test_overlays_inside_the_images_folder_are_no_inputs(model, tmp_path):
    folder = photos(tmp_path / "photos", 3, bad=False)
    extra = ("--overlays", folder / "overlays")
    assert quick(model, folder, tmp_path / "maps.zarr", *extra) == 0
    assert len(list((folder / "overlays").glob("*.png"))) == 3
    assert quick(model, folder, tmp_path / "maps.zarr", *extra) == 0  # the same job: resumes
    assert quick(model, folder, folder / "maps.zarr", "--chunk-size", 2) == 0  # a store there is no input


def test_overlays_never_replace_a_users_pictures(model, tmp_path, capsys):
    folder = photos(tmp_path / "photos", 2, bad=False)
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "000000_photo00_class3.png").write_text("mine")
    assert quick(model, folder, tmp_path / "maps.zarr", "--overlays", tmp_path / "pictures") == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "pictures" / "000000_photo00_class3.png").read_text() == "mine"
    assert not (tmp_path / "maps.zarr").exists()


def test_a_file_name_that_is_not_utf8_is_named(model, tmp_path, capsys):
    folder = photos(tmp_path / "photos", 1, bad=False)
    os.rename(folder / "photo00.png", os.fsencode(folder) + b"/bad\xffname.png")
    assert quick(model, folder, tmp_path / "maps.zarr") == 2
    assert "bad\\xffname.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: ["--classes-file", p / "huge.txt"], "expected class ids"),
        (lambda p: ["--classes-file", p / "empty_rows.txt"], "expected class ids"),
        (lambda p: ["--classes-file", p], "cannot read the classes file"),
        (lambda p: ["--classes", "99999999999"], "class 99999999999 is out of range"),
    ],
    ids=["int32-overflow", "empty-rows", "a-folder", "classes-overflow"],
)
def test_bad_classes_are_refused_before_any_work(model, images, tmp_path, capsys, make, message):
    (tmp_path / "huge.txt").write_text("99999999999\n" * 8)
    (tmp_path / "empty_rows.txt").write_text(",\n" * 8)
    assert quick(model, images, tmp_path / "maps.zarr", *make(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "maps.zarr").exists()


def test_an_empty_npy_file_is_refused(model, tmp_path, capsys):
    (tmp_path / "zero.npy").write_bytes(b"")
    assert quick(model, tmp_path / "zero.npy", tmp_path / "maps.zarr") == 2
    assert "no readable .npy array" in capsys.readouterr().err


def test_a_run_that_leaves_chunks_pending_never_exits_0(model, images, tmp_path, capsys, monkeypatch):
    """What a cluster that loses work looks like to the job: chunks without a marker after the run."""
    monkeypatch.setattr(jobs, "_run_local", lambda worker, todo, progress: None)
    assert quick(model, images, tmp_path / "maps.zarr") == 3
    assert "1 chunk of 1 still pending" in capsys.readouterr().err


def test_dask_leaves_the_environment_as_it_was(model, images, tmp_path):
    pytest.importorskip("distributed")
    prototxt, weights = model
    before = dict(os.environ)
    jobs.run_job(images, prototxt, weights, tmp_path / "maps.zarr", workers=1, mean_value=MEAN, quiet=True)
    assert dict(os.environ) == before  # Dask sets OMP_NUM_THREADS=1 for its workers, here too


# ---- wrong numbers in jobs ----


def test_weights_that_are_not_weights_are_refused(model, images, tmp_path, capsys):
    prototxt, _ = model
    notes = tmp_path / "notes.caffemodel"
    notes.write_text("these are my notes, not weights\n" * 20)
    assert quick((prototxt, notes), images, tmp_path / "maps.zarr") == 2
    assert "notes.caffemodel" in capsys.readouterr().err
    assert not (tmp_path / "maps.zarr").exists()


def test_weights_that_give_nan_are_refused_before_any_work(model, images, tmp_path, capsys):
    prototxt, weights = model
    net = fastsal.load(prototxt, weights)
    net.params["conv1"][0].data[...] = np.nan
    net.save(str(tmp_path / "nan.caffemodel"))
    assert quick((prototxt, tmp_path / "nan.caffemodel"), images, tmp_path / "maps.zarr") == 2
    assert "weights are broken" in capsys.readouterr().err
    assert not (tmp_path / "maps.zarr").exists()


def test_a_model_that_fails_every_image_is_blamed(model, images, tmp_path, capsys):
    """Weights that overflow on every real picture (a plain grey one, the mean itself, passes)."""
    prototxt, weights = model
    net = fastsal.load(prototxt, weights)
    net.params["conv1"][0].data[...] *= 1e37
    net.save(str(tmp_path / "huge.caffemodel"))
    words = run_args((prototxt, tmp_path / "huge.caffemodel"), images, tmp_path / "maps.zarr", "--quiet")
    assert run(*words, "--mean-value", "127.5,127.5,127.5") == 2
    err = capsys.readouterr().err
    assert "every one of the 7 images" in err and "the model or the preprocessing is broken" in err
    assert jobs.done_chunks(str(tmp_path / "maps.zarr")) == {}  # no chunk claims those failures


SMOOTH = ("--method", "smoothgrad", "--samples", 3, "--classes", "0,2")


def test_smoothgrad_without_a_seed_draws_one_and_keeps_it_on_resume(model, images, tmp_path, monkeypatch):
    out = tmp_path / "maps.zarr"
    original, calls = jobs._write_marker, []

    def stop_after_two(output, chunk, summary):
        calls.append(chunk)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(output, chunk, summary)

    monkeypatch.setattr(jobs, "_write_marker", stop_after_two)
    assert quick(model, images, out, "--chunk-size", 2, *SMOOTH) == 130
    monkeypatch.setattr(jobs, "_write_marker", original)
    seed = zarr.open_group(str(out), mode="r").attrs["fastsal"]["plan"]["options"]["seed"]
    assert isinstance(seed, int)
    assert quick(model, images, out, "--chunk-size", 2, *SMOOTH) == 1
    assert quick(model, images, tmp_path / "seeded.zarr", "--chunk-size", 2, *SMOOTH, "--seed", seed) == 1
    np.testing.assert_array_equal(arrays(out)["maps"], arrays(tmp_path / "seeded.zarr")["maps"])


def test_noise_follows_the_image_not_the_chunk(model, tmp_path):
    """Any chunk size gives the same maps, and they are fastsal.attribute's on the same files."""
    prototxt, weights = model
    folder = photos(tmp_path / "photos", 6, bad=False)
    for size in (2, 5):
        assert (
            quick(model, folder, tmp_path / f"c{size}.zarr", "--chunk-size", size, *SMOOTH, "--seed", 4) == 0
        )
    a, b = arrays(tmp_path / "c2.zarr")["maps"], arrays(tmp_path / "c5.zarr")["maps"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a[0], a[2]), "images at the same place in two chunks share no noise"
    pre = Preprocessing((3, 32, 32), mean=np.array(MEAN, np.float32))
    inputs = np.stack([pre(load_image(p)) for p in sorted(folder.iterdir())])
    net = fastsal.load(prototxt, weights)
    api = fastsal.attribute(net, inputs, [0, 2], method="smoothgrad", samples=3, seed=4)
    np.testing.assert_allclose(a, api, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        "np.zeros((2, 3, 32, 32), np.complex64)",
        "np.full((2, 3, 32, 32), 'a')",
        "np.zeros((2, 3, 32, 32), 'datetime64[s]')",
        "np.zeros((2, 3, 32, 32), bool)",
        "np.empty((2, 3, 32, 32), object)",
    ],
    ids=["complex", "unicode", "datetime", "bool", "object"],
)
def test_npy_inputs_of_the_wrong_kind_are_refused(model, tmp_path, capsys, values):
    array = eval(values, {"np": np})
    np.save(tmp_path / "inputs.npy", array, allow_pickle=array.dtype == object)
    assert quick(model, tmp_path / "inputs.npy", tmp_path / "maps.zarr") == 2
    assert "real numbers" in capsys.readouterr().err
    assert not (tmp_path / "maps.zarr").exists()


# ---- Dask: two jobs on one scheduler ----


def test_two_jobs_on_one_dask_scheduler(model, images, tmp_path):
    distributed = pytest.importorskip("distributed")
    jobs_args = {
        "a.zarr": ("--chunk-size", 1, "--classes", "1"),
        "b.zarr": ("--chunk-size", 1, "--classes", "3", "--method", "input_x_gradient"),
    }
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        running = []
        for name, extra in jobs_args.items():
            words = run_args(model, images, tmp_path / name, "--mean-value", "104,117,123", "--quiet", *extra)
            running.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fastsal.cli", *words, "--scheduler", cluster.scheduler_address],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results = [job.communicate(timeout=600) + (job.returncode,) for job in running]
    for (name, extra), (_, stderr, code) in zip(jobs_args.items(), results):
        assert code == 1, stderr  # the broken file, nothing pending
        assert quick(model, images, tmp_path / f"single-{name}", *extra) == 1
        assert_same_store(tmp_path / name, tmp_path / f"single-{name}")


def test_workers_keep_caffe_quiet(model, images, tmp_path):
    pytest.importorskip("distributed")
    result = cli_run(model, images, tmp_path / "maps.zarr", "--workers", 2, "--chunk-size", 4)
    assert result.returncode == 1, result.stderr
    # INFO and WARNING lines; a CUDA build without a GPU logs two honest ERROR lines (no cuBLAS handle).
    glog = [line for line in result.stderr.splitlines() if re.match(r"^[IW]\d{4,8} \d\d:", line)]
    assert not glog, f"{len(glog)} Caffe log lines, e.g. {glog[:3]}"
    # Each worker gets its share of the cores, not all of them.
    share = max(1, default_threads() // 2)
    assert f"on 2 workers x {share} thread" in result.stdout, result.stdout


def test_threads_of_a_local_job(model, images, tmp_path, capsys):
    assert quick(model, images, tmp_path / "maps.zarr", "--threads", 1) == 1
    assert "on 1 thread," in capsys.readouterr().out
    assert quick(model, images, tmp_path / "other.zarr", "--threads", 0) == 2
    assert "threads must be an integer from 1 to" in capsys.readouterr().err


# ---- the CLI tells the truth ----


def test_xarray_opens_a_store(model, images, tmp_path):
    xarray = pytest.importorskip("xarray")
    out = tmp_path / "maps.zarr"
    assert quick(model, images, out, "--top-k", 2) == 1
    dataset = xarray.open_zarr(str(out))  # README's line; warnings are errors here
    assert dataset["maps"].dims == ("image", "class", "y", "x")
    assert "paths" in dataset.coords
    names = [Path(p).name for p in dataset["paths"].values]
    assert names[0] == "broken.png" and dataset["status"].values[0] == jobs.FAILED
    np.testing.assert_array_equal(dataset["maps"].values, arrays(out)["maps"])


def test_io_errors_get_their_own_exit_code_and_one_line(model, images, tmp_path, capsys, monkeypatch):
    def disk_full(output, chunk, summary):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jobs, "_write_marker", disk_full)
    assert quick(model, images, tmp_path / "maps.zarr") == 4
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_ctrl_c_says_how_to_resume(model, images, tmp_path):
    out = tmp_path / "maps.zarr"
    # Each chunk takes long enough (a third of a second idle) that the job cannot finish while a loaded
    # machine delays this test between seeing the first chunk and sending the signal.
    slow = ("--chunk-size", 1, "--method", "integrated_gradients", "--n-steps", 1000, "--classes", "0,1")
    words = run_args(model, images, out, "--mean-value", "104,117,123", "--quiet", *slow)
    job = subprocess.Popen(
        [sys.executable, "-m", "fastsal.cli", *words],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not jobs.done_chunks(str(out)):
        time.sleep(0.005)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.search(r"interrupted after \d+ of 8 chunks; rerun the same command to resume", stderr), stderr
    assert cli_run(model, images, out, *slow).returncode == 1
    assert jobs.status(out)["pending"] == 0


def test_status_says_unfinished_when_images_failed_and_others_are_pending(model, images, tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    assert quick(model, images, out, "--chunk-size", 3) == 1
    first = jobs.MARKERS
    markers = sorted((out / first).glob("chunk-*.json"))
    failed = [m for m in markers if json.loads(m.read_text())["failed"]]
    pending = [m for m in markers if m not in failed]
    pending[0].unlink()
    assert run("status", out) == 3
    assert "1 failed" in capsys.readouterr().out


def test_the_summary_counts_what_this_run_did(model, tmp_path, capsys):
    folder = photos(tmp_path / "photos", 1, bad=False)
    out = tmp_path / "maps.zarr"
    assert quick(model, folder, out) == 0
    line = capsys.readouterr().out
    assert "1 image," in line or "1 image " in line, line
    assert not re.search(r"(?<![\d.])1 images\b", line), line  # "70.1 images/s" is a rate, not a count
    assert quick(model, folder, out) == 0
    again = capsys.readouterr().out
    assert "already done" in again and "images/s" not in again, again
    assert run("status", out) == 0
    text = capsys.readouterr().out
    assert "chunks: 1 of 1 done" in text and "1 chunks" not in text and "1 images" not in text, text


def test_missing_inputs_and_stores_say_so(model, tmp_path, capsys):
    assert quick(model, tmp_path / "no_such_folder", tmp_path / "maps.zarr") == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert run("status", tmp_path / "no_such_store.zarr") == 2
    err = capsys.readouterr().err
    assert "no such store" in err and "not a fastsal store" not in err


def test_debug_after_the_command_shows_the_traceback(model, tmp_path, capsys):
    assert quick(model, tmp_path / "nowhere", tmp_path / "maps.zarr", "--debug") == 2
    assert "Traceback" in capsys.readouterr().err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and fastsal.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "`" not in capsys.readouterr().out
    for command in ("run", "status", "visualize", "dream"):
        sub = [a for a in cli.parser()._subparsers._group_actions[0].choices[command]._actions]
        for action in sub:
            if action.dest != "help":
                assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        cli.main(["visualize", "--help"])
    assert "(default: 200)" in capsys.readouterr().out


def test_a_one_channel_net_runs_with_the_default_flags(tmp_path):
    """classify.py's default channel swap (2,1,0) is for RGB nets: a grey net was refused without
    --channel-swap 0."""
    from conftest import _input, conv, fc, layer, make_net

    text = _input((1, 20, 16), batch=1) + conv("conv1", "data", 4) + layer("relu1", "ReLU", "conv1", "conv1")
    net = make_net(tmp_path, text + fc("fc", "conv1", 3) + layer("prob", "Softmax", "fc"))
    net.save(str(tmp_path / "grey.caffemodel"))
    folder = photos(tmp_path / "photos", 2, bad=False)
    words = ["run", folder, "--model-def", tmp_path / "net.prototxt", "--pretrained-model"]
    assert run(*words, tmp_path / "grey.caffemodel", "-o", tmp_path / "grey.zarr", "--quiet") == 0
    assert zarr.open_group(str(tmp_path / "grey.zarr"))["maps"].shape == (2, 1, 20, 16)
