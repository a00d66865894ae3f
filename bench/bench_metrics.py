"""Metrics of maps: fastsal.evaluate against the reference libraries on the same weights, in one process.

    .venv/bin/pip install ".[bench]" quantus==0.6.0   # torch + captum + Quantus
    .venv/bin/python bench/bench_metrics.py            # ~20 min on 2 busy cores: writes metrics.{json,md}

Deletion and insertion: fastsal (every row of every (image, class) pair and both games in one stream),
exact and inexact (``exact=False``: oneDNN's forward), against RISE's CausalMetric protocol in PyTorch
(RISE's ``evaluate``: all images advanced one step at a time, a batched forward per step, the model
followed by a softmax; one run per class column, as RISE explains each image's top class), on the Caffe
net translated by fastsal.torch_port, the same maps. MPRT (cascading, one image, saliency maps) against
Quantus 0.6.0's MPRT (top_down) with Captum's Saliency as its explain_func, like with like: the same
layers (those Quantus resets; Caffe's Scale layers are inside torch's BatchNorm2d) and Quantus's one
similarity (Spearman of |map|). ROAD (most relevant first, accuracy) against Quantus 0.6.0's ROAD on
the same maps and noise (see quantus_road). Both sides warmed up first; alternating, best of
``--repeats``; the curves' agreement and the load average of each timing are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
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


def quantus_layers(net, model) -> list[str]:
    """The Caffe layers behind the torch modules Quantus's MPRT resets (those with reset_parameters):
    convolutions, fully connected layers and BatchNorm; torch_port merges a Scale into its BatchNorm2d,
    which Quantus resets whole, so Caffe's Scale layers have no step of their own there."""
    names = [name.split(".")[1] for name, m in model.named_modules() if hasattr(m, "reset_parameters")]
    return [name for name in names if name in net.params]


def quantus_mprt(model, images, classes, maps):
    import quantus
    import torch
    from captum.attr import Saliency

    def explain(model, inputs, targets, **kwargs):
        x = torch.from_numpy(np.asarray(inputs, np.float32)).requires_grad_()
        grads = Saliency(model).attribute(x, target=torch.from_numpy(np.asarray(targets)), abs=True)
        return grads.detach().numpy().max(axis=1, keepdims=True)

    metric = quantus.MPRT(layer_order="top_down", disable_warnings=True)  # similarity_func: Spearman
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


def quantus_road(model, images, labels, maps, road):
    """Quantus 0.6.0's ROAD (its evaluate_batch: its own noisy_linear_imputation, one batched forward per
    percentage, accuracy) on fastsal's maps and noise. Quantus ranks the map broadcast to the image's
    shape but imputes by pixel (three channels: IndexError), so it gets the map in channel 0 and -inf in
    the others: its ranking of the broadcast map is then the pixels' ranking. np.random.randn is handed
    fastsal's documented draws in Quantus's order (percentages outside, images inside)."""
    import quantus

    n, c, h, w = images.shape
    draws = iter(
        road.noise_for(i, 0, j, (c, int(h * w * p / 100)))
        for j, p in enumerate(road.percentages)
        for i in range(n)
    )
    ranked = np.full(images.shape, -np.inf, np.float32)
    ranked[:, 0] = maps
    metric = quantus.ROAD(
        percentages=road.percentages, noise=road.noise, normalise=False, abs=False, disable_warnings=True
    )
    metric.a_size = h * w  # what Quantus's __call__ would set from a one-channel map
    wrapped = quantus.helpers.utils.get_wrapped_model(model, channel_first=True, softmax=True, device="cpu")
    randn = np.random.randn
    np.random.randn = lambda *shape: next(draws).reshape(shape) / road.noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (curves,) = metric.evaluate_batch(model=wrapped, x_batch=images, y_batch=labels, a_batch=ranked)
    finally:
        np.random.randn = randn
    return curves


def timed(fn, *args, **kwargs):
    time.sleep(SETTLE_S)  # bench_saliency.SETTLE_S: the last method's threads settle
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result, load


def run(models, repeats: int, step: int, workdir: Path) -> list[dict]:
    from fastsal.torch_port import to_torch

    rows = []

    def report(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in models:
        prototxt, net, score, images = load_model(name, MODELS[name], workdir)
        model = to_torch(net, str(prototxt), score).eval()
        warm = np.zeros((1, 1), np.int64)  # warm up both sides: memory, oneDNN's kernels, torch's
        pixels = images.shape[2] * images.shape[3]
        warm_maps = fastsal.compute(net, images[:1], warm)
        for exact in (True, False):
            fastsal.evaluate(
                net, images[:1], warm, [fastsal.metrics.Deletion(step=pixels)], maps=warm_maps, exact=exact
            )
        rise_pytorch(model, images[:1], warm, warm_maps, pixels)
        for k in (1, 2):
            classes = np.tile(np.arange(k), (len(images), 1))
            maps = fastsal.compute(net, images, classes)
            games = [fastsal.metrics.Deletion(step=step), fastsal.metrics.Insertion(step=step)]
            times = {"fastsal": [], "fastsal_inexact": [], "rise": []}
            loads = []
            for _ in range(repeats):
                t, ours, load = timed(fastsal.evaluate, net, images, classes, games, maps=maps)
                times["fastsal"].append(t)
                loads.append(load)
                t, inexact, load = timed(
                    fastsal.evaluate, net, images, classes, games, maps=maps, exact=False
                )
                times["fastsal_inexact"].append(t)
                loads.append(load)
                t, theirs, load = timed(rise_pytorch, model, images, classes, maps, step)
                times["rise"].append(t)
                loads.append(load)
            difference = max(
                float(np.abs(ours["deletion_curve"] - theirs[0]).max()),
                float(np.abs(ours["insertion_curve"] - theirs[1]).max()),
            )
            inexact_difference = max(
                float(np.abs(inexact[f"{game}_curve"] - ours[f"{game}_curve"]).max())
                for game in ("deletion", "insertion")
            )
            report(
                {
                    "model": name,
                    "metric": "deletion+insertion",
                    "N": len(images),
                    "K": k,
                    "step": step,
                    "seconds": {label: min(t) for label, t in times.items()},
                    "reference": "rise",
                    "ratio": min(times["rise"]) / min(times["fastsal"]),
                    "ratio_inexact": min(times["rise"]) / min(times["fastsal_inexact"]),
                    "max_curve_difference": difference,
                    "inexact_max_curve_difference": inexact_difference,
                    "load_average_1min": loads,
                }
            )
        # MPRT: one image, cascading over the layers Quantus randomises, Spearman of |map| only (Quantus's
        # one similarity_func); the random draws differ (torch's reset_parameters against fastsal's).
        classes = np.zeros((1, 1), np.int64)
        layers = quantus_layers(net, model)
        mprt = fastsal.metrics.MPRT(layers=layers, similarities=["spearman_abs"])
        t_ours, ours, l_ours = timed(fastsal.evaluate, net, images[:1], classes, mprt, method="saliency")
        t_inexact, _, l_inexact = timed(
            fastsal.evaluate, net, images[:1], classes, mprt, method="saliency", exact=False
        )
        maps = fastsal.compute(net, images[:1], classes)
        t_theirs, theirs, l_theirs = timed(quantus_mprt, model, images[:1], classes, maps)
        report(
            {
                "model": name,
                "metric": "mprt (cascading, saliency, spearman_abs)",
                "N": 1,
                "K": 1,
                "steps": {"fastsal": len(ours["mprt_layers"]), "quantus": len(theirs) - 1},
                "seconds": {"fastsal": t_ours, "fastsal_inexact": t_inexact, "quantus": t_theirs},
                "reference": "quantus",
                "ratio": t_theirs / t_ours,
                "ratio_inexact": t_theirs / t_inexact,
                "load_average_1min": [l_ours, l_inexact, l_theirs],
                "note": "same layers, same number of maps; random draws differ (torch's reset_parameters)",
            }
        )
        # ROAD: Quantus's accuracy output, the same maps and noise; its default noise, 5 percentages.
        n = len(images)
        classes = np.zeros((n, 1), np.int64)
        maps = fastsal.compute(net, images, classes)
        road = fastsal.metrics.RoadMoRF(percentages=[10, 30, 50, 70, 90], output="accuracy")
        t_ours, ours, l_ours = timed(fastsal.evaluate, net, images, classes, road, maps=maps)
        t_inexact, _, l_inexact = timed(fastsal.evaluate, net, images, classes, road, maps=maps, exact=False)
        t_theirs, theirs, l_theirs = timed(quantus_road, model, images, classes[:, 0], maps[:, 0], road)
        report(
            {
                "model": name,
                "metric": "road_morf (5 percentages, accuracy)",
                "N": n,
                "K": 1,
                "seconds": {"fastsal": t_ours, "fastsal_inexact": t_inexact, "quantus": t_theirs},
                "reference": "quantus",
                "ratio": t_theirs / t_ours,
                "ratio_inexact": t_theirs / t_inexact,
                "curve_points_agreeing": f"{int((ours['road_morf_curve'][:, 0] == theirs).sum())}/{theirs.size}",
                "load_average_1min": [l_ours, l_inexact, l_theirs],
            }
        )
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
    m = results["machine"]
    lines = [
        f"Host: {m['cpu']} (family 6 model {m['cpu_model_number']}), {m['cores']} cores, ISA {m['isa']}; "
        f"oneDNN {m['caffe_onednn_isa']}, OpenBLAS core {m['caffe_openblas_core']}. One run, best of "
        f"{args.repeats}; load average (1 min) at the start of each timing, in the order of the columns.",
        "",
        "| model | metric | N | K | fastsal s | fastsal inexact s | reference | reference s | ratio | ratio inexact "
        "| agreement | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        s = r["seconds"]
        theirs = s[r["reference"]]
        if "max_curve_difference" in r:
            agreement = f"curves {r['max_curve_difference']:.1e}"
        elif "curve_points_agreeing" in r:
            agreement = f"{r['curve_points_agreeing']} points"
        else:
            agreement = f"steps {r['steps']['fastsal']} / {r['steps']['quantus']}"
        loads = ", ".join(f"{x:.1f}" for x in r["load_average_1min"])
        lines.append(
            f"| {r['model']} | {r['metric']} | {r['N']} | {r['K']} | {s['fastsal']:.2f} | {s['fastsal_inexact']:.2f} | "
            f"{r['reference']} | {theirs:.2f} | {r['ratio']:.2f}x | {r['ratio_inexact']:.2f}x | {agreement} | {loads} |"
        )
    (args.out / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
