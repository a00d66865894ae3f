"""Integrated Gradients, SmoothGrad and DeepLIFT: fastsal against Captum on the same weights, in one process.

    .venv/bin/pip install ".[bench]"                  # torch + captum
    .venv/bin/python bench/bench_methods.py            # ~20 min on 2 cores: writes methods.{json,md}
    .venv/bin/python bench/bench_methods.py --methods deeplift   # only those rows, the others kept

For each model and K it alternates fastsal.Attribution (exact, and the inexact mode exact=False) and
Captum's IntegratedGradients (n_steps=50,
Gauss-Legendre, baseline 0) and NoiseTunnel(Saliency) (25 samples, the same absolute stdev) on the
Caffe net translated to PyTorch (fastsal.torch_port), one target column per Captum call, as its users
write it. DeepLift (baseline 0) runs with the two fixes fastsal.torch_port documents (a copy of each
max pooling's input, the summing unpool: they cost a clone and a scatter), so that its maps are comparable.
Reports maps/s, the ratio, IG's and DeepLIFT's agreement with Captum (DeepLIFT: Spearman per map too), the
host and load average around each row, and the peak memory of fastsal's IG at 10 and then 100 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import fastsal
from bench_saliency import HERE, SETTLE_S, load_model, machine

CONFIGS = {"open_nsfw": [1, 2], "vgg16": [1, 2, 10]}  # K per model, N = 1
METHODS = {"integrated_gradients": {"n_steps": 50}, "smoothgrad": {"samples": 25}, "deeplift": {}}
ONLY_K = {("deeplift", "vgg16"): [1, 10]}  # fewer points where the run is long
AGREEMENT = ("integrated_gradients", "deeplift")  # the same numbers on both sides (no noise)


def captum_runner(model, method: str, stdev: float):
    import torch
    from captum.attr import DeepLift, IntegratedGradients, NoiseTunnel, Saliency

    from fastsal.torch_port import deeplift_summing_unpool

    if method == "deeplift":
        model = copy.deepcopy(model).copy_pooling_inputs()

    def run(images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).requires_grad_()
        out = []
        for k in range(classes.shape[1]):
            target = torch.from_numpy(classes[:, k].astype(np.int64))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if method == "integrated_gradients":
                    a = IntegratedGradients(model).attribute(x, target=target, n_steps=50)
                elif method == "deeplift":
                    with deeplift_summing_unpool():
                        a = DeepLift(model).attribute(x, target=target)
                else:
                    a = NoiseTunnel(Saliency(model)).attribute(
                        x, nt_type="smoothgrad", nt_samples=25, stdevs=stdev, target=target, abs=False
                    )
            out.append(a.detach().numpy())
        return np.stack(out, axis=1)

    return run


def run(models, methods, repeats: int, workdir: Path) -> list[dict]:
    from scipy.stats import spearmanr

    from fastsal.torch_port import to_torch

    rows = []
    for name in models:
        prototxt, net, score, images = load_model(name, 1, workdir)
        model = to_torch(net, str(prototxt), score)
        stdev = float(0.15 * (images.max() - images.min()))
        for k in CONFIGS[name]:
            classes = np.arange(k)[None, :]
            for method in methods:
                options = METHODS[method]
                if k not in ONLY_K.get((method, name), [k]):
                    continue
                load_before = os.getloadavg()[0]
                extra = {"stdev": stdev, "seed": 0} if method == "smoothgrad" else {}
                ours = fastsal.Attribution(net, method, reduce="none", **options, **extra)
                inexact = fastsal.Attribution(net, method, reduce="none", exact=False, **options, **extra)
                theirs = captum_runner(model, method, stdev)
                for fn in (ours.compute, inexact.compute, theirs):  # warm up: memory, oneDNN's kernels
                    fn(images, classes[:, :1])
                times = {"fastsal": [], "inexact": [], "captum": []}
                for _ in range(repeats):
                    for label, fn in (
                        ("fastsal", ours.compute),
                        ("inexact", inexact.compute),
                        ("captum", theirs),
                    ):
                        time.sleep(SETTLE_S)  # bench_saliency.SETTLE_S: the last method's threads settle
                        start = time.perf_counter()
                        result = fn(images, classes)
                        times[label].append(time.perf_counter() - start)
                        if label == "fastsal":
                            mine = result
                        else:
                            reference = result
                best = {label: min(t) for label, t in times.items()}
                row = {
                    "model": name,
                    "method": method,
                    "K": k,
                    "maps_per_s": {label: k / t for label, t in best.items()},
                    "speedup_vs_captum": best["captum"] / best["fastsal"],
                    "inexact_speedup_vs_captum": best["captum"] / best["inexact"],
                    "host": socket.gethostname(),
                    "load_average_1min": [load_before, os.getloadavg()[0]],  # before, after
                }
                if method in AGREEMENT:
                    scale = np.abs(reference).max()
                    row["within_1e-3_of_max"] = float((np.abs(mine - reference) <= 1e-3 * scale).mean())
                if method == "deeplift":  # per map, as tests/test_captum.py checks it
                    row["spearman_min"] = min(
                        float(spearmanr(mine[0, j].ravel(), reference[0, j].ravel()).statistic)
                        for j in range(k)
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def memory() -> list[dict]:
    """The process's peak RSS after IG at 10 steps, then at 100: peaks only grow, so an equal second
    number means the larger run needed no more memory."""
    import resource

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, net, _, images = load_model("open_nsfw", 1, Path(tmp))
        for steps in (10, 100):
            fastsal.Attribution(net, "integrated_gradients", n_steps=steps).compute(images, [0, 1])
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append({"model": "open_nsfw", "n_steps": steps, "peak_rss_mb": peak})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory study")
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    if args.memory_only:  # keeps the timed runs of the results file
        results = json.loads((args.out / "methods.json").read_text())
        results["memory"] = memory()
    elif set(args.methods) != set(METHODS) and (args.out / "methods.json").exists():
        # Only those methods' rows are replaced, with their own run's machine beside them.
        results = json.loads((args.out / "methods.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            new = run(args.models, args.methods, args.repeats, Path(tmp))
        results["runs"] = [r for r in results["runs"] if r["method"] not in args.methods] + new
        results.setdefault("machines_by_method", {}).update({m: machine() for m in args.methods})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = {
                "machine": machine(),
                "runs": run(args.models, args.methods, args.repeats, Path(tmp)),
                "memory": memory(),
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "methods.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| model | method | K | fastsal maps/s | captum maps/s | fastsal / captum | inexact maps/s "
        "| inexact / captum | within 1e-3 of max (IG, DeepLIFT) | Spearman min per map | host, load avg |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        m = r["maps_per_s"]
        agree = f"{r['within_1e-3_of_max']:.2%}" if "within_1e-3_of_max" in r else "- (different noise)"
        spearman = f"{r['spearman_min']:.5f}" if "spearman_min" in r else "-"
        load = r.get("load_average_1min")
        where = f"{r['host']}, {load[0]:.1f} / {load[1]:.1f}" if load else "-"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['K']} | {m['fastsal']:.3f} | {m['captum']:.3f} | "
            f"{r['speedup_vs_captum']:.2f}x | {m['inexact']:.3f} | {r['inexact_speedup_vs_captum']:.2f}x | {agree} "
            f"| {spearman} | {where} |"
        )
    lines += [
        "",
        "| model | IG n_steps (in this order, one process) | peak RSS so far (MB) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['n_steps']} | {r['peak_rss_mb']:.0f} |" for r in results["memory"]]
    (args.out / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
