"""A job over JPEGs on disk against the engine alone on the same preprocessed arrays, in one run.

    .venv/bin/python bench/bench_jobs.py        # ~5 min on 2 cores: writes jobs.{json,md}

open_nsfw (top-1 saliency), 200 JPEGs of mixed sizes cut from scikit-image's photos: the whole job
(decode, preprocess, engine, Zarr writes, markers) against ``Attribution.explain`` on the arrays the
job's preprocessing makes, chunk by chunk as the job runs it; alternating, best of --repeats. Then the
job's peak RSS in fresh processes over 100 and 1,000 images.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import fastsal
from bench_saliency import HERE, machine
from fastsal import _attribution, examples, jobs
from fastsal._preprocess import Preprocessing, load_image

MEAN = [104.0, 117.0, 123.0]


def make_jpegs(folder: Path, count: int) -> None:
    """Crops of the sample photos at mixed sizes, as JPEG files."""
    rng = np.random.default_rng(0)
    photos = list(examples.sample_photos().values())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = rng.integers(200, min(photo.shape[:2]) + 1, size=2)
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        Image.fromarray(photo[top : top + h, left : left + w]).save(folder / f"img{i:05d}.jpg", quality=90)


def throughput(folder: Path, repeats: int, workdir: Path) -> dict:
    prototxt, weights = examples.open_nsfw_files()
    options = dict(top_k=1, images_dim=(256, 256), mean_value=MEAN, chunk_size=64, quiet=True)
    preprocessing = Preprocessing((3, 224, 224), images_dim=(256, 256), mean=np.array(MEAN, np.float32))
    paths = sorted(folder.glob("*.jpg"))
    arrays = np.stack([preprocessing(load_image(p)) for p in paths])
    net = fastsal.load(prototxt, weights)
    engine = _attribution.Attribution(net, "saliency")
    engine.explain(arrays[:2], k=1)  # warm up
    times = {"job": [], "engine": []}
    for r in range(repeats):
        start = time.perf_counter()
        jobs.run_job(folder, prototxt, weights, workdir / f"run{r}.zarr", **options)
        times["job"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for first in range(0, len(arrays), 64):
            engine.explain(arrays[first : first + 64], k=1)
        times["engine"].append(time.perf_counter() - start)
    best = {label: min(t) for label, t in times.items()}
    return {
        "images": len(paths),
        "maps_per_s": {label: len(paths) / t for label, t in best.items()},
        "job_over_engine": best["engine"] / best["job"],
    }


def spread(folder: Path, repeats: int, workdir: Path) -> list[dict]:
    """The whole `fastsal run` in one process and on a Dask LocalCluster of 1 and 2 workers (each worker
    gets its share of the cores), start-up included, alternating; best of repeats."""
    prototxt, weights = examples.open_nsfw_files()
    options = dict(top_k=1, images_dim=(256, 256), mean_value=MEAN, chunk_size=16, quiet=True)
    count = len(list(folder.glob("*.jpg")))
    times: dict = {None: [], 1: [], 2: []}
    for r in range(repeats):
        for workers in times:
            start = time.perf_counter()
            jobs.run_job(
                folder, prototxt, weights, workdir / f"spread{r}-{workers}.zarr", workers=workers, **options
            )
            times[workers].append(time.perf_counter() - start)
    return [
        {
            "workers": w,
            "seconds": min(t),
            "maps_per_s": count / min(t),
        }
        for w, t in times.items()
    ]


def probe(folder: str, out: str) -> None:
    prototxt, weights = examples.open_nsfw_files()
    jobs.run_job(folder, prototxt, weights, out, top_k=1, mean_value=MEAN, chunk_size=64, quiet=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def memory(workdir: Path) -> list[dict]:
    rows = []
    for count in (100, 1000):
        folder = workdir / f"memory{count}"
        make_jpegs(folder, count)
        out = subprocess.run(
            [sys.executable, __file__, "--probe", str(folder), str(workdir / f"memory{count}.zarr")],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append({"images": count, "peak_rss_mb": float(out.stdout.split()[-1])})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    if args.probe:
        return probe(*args.probe)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_jpegs(workdir / "images", args.images)
        results = {
            "machine": machine(),
            "throughput": throughput(workdir / "images", args.repeats, workdir),
            "workers": spread(workdir / "images", args.repeats, workdir),
            "memory": memory(workdir),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jobs.json").write_text(json.dumps(results, indent=1) + "\n")
    t = results["throughput"]
    lines = [
        "| images | job maps/s | engine alone maps/s | job / engine |",
        "|---|---|---|---|",
        f"| {t['images']} | {t['maps_per_s']['job']:.2f} | {t['maps_per_s']['engine']:.2f} | {t['job_over_engine']:.2f}x |",
        "",
        "| fastsal run | seconds (start-up included) | maps/s |",
        "|---|---|---|",
        *(
            f"| {'one process' if r['workers'] is None else '--workers ' + str(r['workers'])} | "
            f"{r['seconds']:.1f} | {r['maps_per_s']:.2f} |"
            for r in results["workers"]
        ),
        "",
        "| images in the job | peak RSS (MB) |",
        "|---|---|",
        *(f"| {r['images']} | {r['peak_rss_mb']:.0f} |" for r in results["memory"]),
    ]
    (args.out / "jobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
