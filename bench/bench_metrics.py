"""Metrics of maps: fastsal.evaluate against the reference libraries on the same weights, in one process.

    .venv/bin/pip install ".[bench]" quantus==0.6.0   # torch + captum + Quantus
    .venv/bin/python bench/bench_metrics.py            # ~10 min on 2 cores: writes metrics.{json,md}

Deletion and insertion: fastsal (every row of every (image, class) pair and both games in one stream)
against RISE's CausalMetric protocol in PyTorch (RISE's ``evaluate``: all images advanced one step at a
time, a batched forward per step, the model followed by a softmax; one run per class column, as RISE
explains each image's top class), on the Caffe net translated by fastsal.torch_port, the same maps.
MPRT (cascading, every layer, saliency maps) against Quantus 0.6.0's MPRT (top_down) with Captum's
Saliency as its explain_func. ROAD: fastsal's time alone; Quantus 0.6.0's ROAD raises IndexError on
three-channel images (it ranks the map broadcast over the channels but imputes by pixel), so it has
no ratio. Both sides warmed up first; alternating, best of ``--repeats``; the curves' largest
difference is reported too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.ndimage

import fastsal
from bench_saliency import HERE, SETTLE_S, load_model, machine

MODELS = {"open_nsfw": 2, "vgg16": 1}  # N per model


def rise_pytorch(model, images: np.ndarray, classes: np.ndarray, maps: np.ndarray, step: int):
    """RISE's deletion and insertion protocol in PyTorch, one class column per run: (deletion curves,
    insertion curves), each (N, K, points). Written from RISE's evaluation.py's structure, not copied."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = images.shape
    hw = h * w
    points = (hw + step - 1) // step + 1
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = torch.zeros(c, c, 11, 11)
    for i in range(c):
        kernel[i, i] = torch.from_numpy(scipy.ndimage.gaussian_filter(delta, 5).astype(np.float32))
    probabilities = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    x = torch.from_numpy(images)
    out = {}
    with torch.no_grad():
        blurred = F.conv2d(x, kernel, padding=5)
        for mode, start0, finish in (("deletion", x, torch.zeros_like(x)), ("insertion", blurred, x)):
            curves = np.empty((n, classes.shape[1], points))
            for k in range(classes.shape[1]):
                order = np.argsort(-maps[:, k].reshape(n, hw), axis=1, kind="stable")
                start = start0.clone()
                rows = np.arange(n)[:, None]
                for i in range(points):
                    p = probabilities(start).numpy()
                    curves[:, k, i] = p[np.arange(n), classes[:, k]]
                    coords = order[:, step * i : step * (i + 1)]
                    start.numpy().reshape(n, c, hw)[rows, :, coords] = finish.numpy().reshape(n, c, hw)[
                        rows, :, coords
                    ]
            out[mode] = curves
    return out["deletion"], out["insertion"]


def quantus_mprt(net, model, images, classes):
    import quantus
    import torch
    from captum.attr import Saliency

    def explain(model, inputs, targets, **kwargs):
        x = torch.from_numpy(np.asarray(inputs, np.float32)).requires_grad_()
        grads = Saliency(model).attribute(x, target=torch.from_numpy(np.asarray(targets)), abs=True)
        return grads.detach().numpy().max(axis=1, keepdims=True)

    maps = fastsal.compute(net, images, classes)
    metric = quantus.MPRT(layer_order="top_down", disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(
            model=model,
            x_batch=images,
            y_batch=classes[:, 0],
            a_batch=maps,
            explain_func=explain,
            channel_first=True,
            device="cpu",
        )


def timed(fn, *args, **kwargs):
    time.sleep(SETTLE_S)  # bench_saliency.SETTLE_S: the last method's threads settle
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def run(models, repeats: int, step: int, workdir: Path) -> list[dict]:
    from fastsal.torch_port import to_torch

    rows = []
    for name in models:
        prototxt, net, score, images = load_model(name, MODELS[name], workdir)
        model = to_torch(net, str(prototxt), score).eval()
        warm = np.zeros((1, 1), np.int64)  # warm up both sides: memory, oneDNN's kernels, torch's
        pixels = images.shape[2] * images.shape[3]
        warm_maps = fastsal.compute(net, images[:1], warm)
        fastsal.evaluate(net, images[:1], warm, [fastsal.metrics.Deletion(step=pixels)], maps=warm_maps)
        rise_pytorch(model, images[:1], warm, warm_maps, pixels)
        for k in (1, 2):
            classes = np.tile(np.arange(k), (len(images), 1))
            maps = fastsal.compute(net, images, classes)
            games = [fastsal.metrics.Deletion(step=step), fastsal.metrics.Insertion(step=step)]
            times = {"fastsal": [], "rise": []}
            for _ in range(repeats):
                t, ours = timed(fastsal.evaluate, net, images, classes, games, maps=maps)
                times["fastsal"].append(t)
                t, theirs = timed(rise_pytorch, model, images, classes, maps, step)
                times["rise"].append(t)
            difference = max(
                float(np.abs(ours["deletion_curve"] - theirs[0]).max()),
                float(np.abs(ours["insertion_curve"] - theirs[1]).max()),
            )
            row = {
                "model": name,
                "metric": "deletion+insertion",
                "N": len(images),
                "K": k,
                "step": step,
                "seconds": {label: min(t) for label, t in times.items()},
                "ratio": min(times["rise"]) / min(times["fastsal"]),
                "max_curve_difference": difference,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        classes = np.zeros((1, 1), np.int64)  # MPRT: one image, every layer
        t_ours, ours = timed(
            fastsal.evaluate, net, images[:1], classes, fastsal.metrics.MPRT(), method="saliency"
        )
        try:
            t_theirs, theirs = timed(quantus_mprt, net, model, images[:1], classes)
            ratio = t_theirs / t_ours
        except ImportError:
            t_theirs, ratio = None, None
        rows.append(
            {
                "model": name,
                "metric": "mprt (cascading, saliency)",
                "N": 1,
                "K": 1,
                "layers": {
                    "fastsal": len(ours["mprt_layers"]),
                    "quantus": None if t_theirs is None else len(theirs) - 1,
                },
                "seconds": {"fastsal": t_ours, "quantus": t_theirs},
                "ratio": ratio,
                "note": "random draws differ (torch's reset_parameters against fastsal's seeded normal)",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        road = fastsal.metrics.RoadMoRF(percentages=[10, 30, 50, 70, 90])
        t_road, _ = timed(fastsal.evaluate, net, images[:1], classes, road, maps=maps[:1, :1])
        rows.append(
            {
                "model": name,
                "metric": "road_morf (5 percentages)",
                "N": 1,
                "K": 1,
                "seconds": {"fastsal": t_road, "quantus": None},
                "ratio": None,
                "note": "Quantus 0.6.0's ROAD: IndexError on three-channel images",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--step", type=int, default=224 * 8, help="pixels per deletion/insertion step")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"machine": machine(), "runs": run(args.models, args.repeats, args.step, Path(tmp))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| model | metric | N | K | fastsal s | reference | reference s | reference / fastsal | max curve diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        s = r["seconds"]
        reference = "rise" if "rise" in s else "quantus"
        theirs = "-" if s[reference] is None else f"{s[reference]:.2f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        diff = f"{r['max_curve_difference']:.1e}" if "max_curve_difference" in r else "-"
        lines.append(
            f"| {r['model']} | {r['metric']} | {r['N']} | {r['K']} | {s['fastsal']:.2f} | {reference} | "
            f"{theirs} | {ratio} | {diff} |"
        )
    (args.out / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
