"""Integrated Gradients and SmoothGrad: fastsal against Captum on the same weights, in one process.

    .venv/bin/pip install ".[bench]"                  # torch + captum
    .venv/bin/python bench/bench_methods.py            # ~20 min on 2 cores: writes methods.{json,md}

For each model and K it alternates fastsal.Attribution (exact, and the inexact mode exact=False) and
Captum's IntegratedGradients (n_steps=50,
Gauss-Legendre, baseline 0) and NoiseTunnel(Saliency) (25 samples, the same absolute stdev) on the
Caffe net translated to PyTorch (fastsal.torch_port), one target column per Captum call, as its users
write it. Reports maps/s, the ratio, IG's agreement with Captum, and the peak memory of fastsal's IG at
10 and then 100 steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import fastsal
from bench_saliency import HERE, SETTLE_S, load_model, machine

CONFIGS = {"open_nsfw": [1, 2], "vgg16": [1, 2, 10]}  # K per model, N = 1
METHODS = {"integrated_gradients": {"n_steps": 50}, "smoothgrad": {"samples": 25}}


def captum_runner(model, method: str, stdev: float):
    import torch
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    def run(images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).requires_grad_()
        out = []
        for k in range(classes.shape[1]):
            target = torch.from_numpy(classes[:, k].astype(np.int64))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if method == "integrated_gradients":
                    a = IntegratedGradients(model).attribute(x, target=target, n_steps=50)
                else:
                    a = NoiseTunnel(Saliency(model)).attribute(
                        x, nt_type="smoothgrad", nt_samples=25, stdevs=stdev, target=target, abs=False
                    )
            out.append(a.detach().numpy())
        return np.stack(out, axis=1)

    return run


def run(models, repeats: int, workdir: Path) -> list[dict]:
    from fastsal.torch_port import to_torch

    rows = []
    for name in models:
        prototxt, net, score, images = load_model(name, 1, workdir)
        model = to_torch(net, str(prototxt), score)
        stdev = float(0.15 * (images.max() - images.min()))
        for k in CONFIGS[name]:
            classes = np.arange(k)[None, :]
            for method, options in METHODS.items():
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
                }
                if method == "integrated_gradients":
                    scale = np.abs(reference).max()
                    row["within_1e-3_of_max"] = float((np.abs(mine - reference) <= 1e-3 * scale).mean())
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
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory study")
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    if args.memory_only:  # keeps the timed runs of the results file
        results = json.loads((args.out / "methods.json").read_text())
        results["memory"] = memory()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = {
                "machine": machine(),
                "runs": run(args.models, args.repeats, Path(tmp)),
                "memory": memory(),
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "methods.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| model | method | K | fastsal maps/s | captum maps/s | fastsal / captum | inexact maps/s "
        "| inexact / captum | IG: within 1e-3 of max |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        m = r["maps_per_s"]
        agree = f"{r['within_1e-3_of_max']:.2%}" if "within_1e-3_of_max" in r else "- (different noise)"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['K']} | {m['fastsal']:.3f} | {m['captum']:.3f} | "
            f"{r['speedup_vs_captum']:.2f}x | {m['inexact']:.3f} | {r['inexact_speedup_vs_captum']:.2f}x | {agree} |"
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
