"""LRP: fastsal against zennit on the same weights (fastsal.torch_port), in one process.

    .venv/bin/pip install ".[bench]" zennit==0.5.1
    OPENBLAS_CORETYPE=SkylakeX .venv/bin/python bench/bench_lrp.py   # ~15 min on 2 cores: lrp.{json,md}
    .venv/bin/python bench/bench_lrp.py --out lrp_prescott             # as installed: OpenBLAS's generic kernels

For each model and K (N = 1) it alternates fastsal.Attribution(method="lrp"), the same with exact=False
(oneDNN's forward) and zennit's Gradient attributor with the same composite (epsilon_gamma_box for
VGG-16, bounds: black and white pixels after the ImageNet mean; epsilon_plus for open_nsfw, BatchNorm
merged into the torch model as fastsal merges it), one class per zennit call as its users write it.
Reports maps/s (best of the repeats), the ratio of the bests and the median of each repeat's back-to-back
ratio, the load average around each row (a shared machine), and the agreement with zennit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fastsal
from bench_saliency import HERE, SETTLE_S, load_model, machine

CONFIGS = {"open_nsfw": ("epsilon_plus", [1, 2]), "vgg16": ("epsilon_gamma_box", [1, 10])}
MEAN = np.array([104.0, 117.0, 123.0])


def run(models, repeats: int, workdir: Path) -> list[dict]:
    import torch
    from zennit.composites import EpsilonGammaBox, EpsilonPlus

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_lrp_zennit import zennit_model, zennit_relevance

    rows = []
    for name in models:
        prototxt, net, score, images = load_model(name, 1, workdir)
        model = zennit_model(net, str(prototxt), score)
        composite, ks = CONFIGS[name]
        low, high = -MEAN, 255 - MEAN
        options = {"low": low, "high": high} if composite == "epsilon_gamma_box" else {}
        bounds = [torch.tensor(b, dtype=torch.float32).view(1, 3, 1, 1) for b in (low, high)]
        theirs_composite = (
            EpsilonGammaBox(low=bounds[0], high=bounds[1])
            if composite == "epsilon_gamma_box"
            else EpsilonPlus()
        )
        num_classes = net.blobs[score].data[0].size
        options.update(composite=composite, score=score, reduce="none")
        ours = fastsal.Attribution(net, "lrp", **options)
        inexact = fastsal.Attribution(net, "lrp", exact=False, **options)
        for k in ks:
            classes = np.arange(k)[None, :]

            def theirs(images, classes, model=model, composite=theirs_composite, count=num_classes):
                return zennit_relevance(model, composite, images, classes, count)

            runs = (("fastsal", ours.compute), ("inexact", inexact.compute), ("zennit", theirs))
            for _, fn in runs:  # warm up: memory, the modified weights laid out
                fn(images, classes[:, :1])
            load_before = os.getloadavg()[0]
            times: dict[str, list[float]] = {label: [] for label, _ in runs}
            results = {}
            for _ in range(repeats):
                for label, fn in runs:
                    time.sleep(SETTLE_S)
                    start = time.perf_counter()
                    results[label] = fn(images, classes)
                    times[label].append(time.perf_counter() - start)
            best = {label: min(t) for label, t in times.items()}
            reference = results["zennit"]
            scale = np.abs(reference).reshape(k, -1).max(axis=1)[:, None, None, None]

            def within(label, results=results, reference=reference, scale=scale):
                return float((np.abs(results[label][0] - reference[0]) <= 1e-3 * scale).mean())

            rows.append(
                {
                    "model": name,
                    "composite": composite,
                    "K": k,
                    "maps_per_s": {label: k / t for label, t in best.items()},
                    "speedup_vs_zennit": best["zennit"] / best["fastsal"],
                    "inexact_speedup_vs_zennit": best["zennit"] / best["inexact"],
                    "median_paired_speedup": statistics.median(
                        z / f for z, f in zip(times["zennit"], times["fastsal"])
                    ),
                    "load_average": [load_before, os.getloadavg()[0]],
                    "within_1e-3_of_max": within("fastsal"),
                    "inexact_within_1e-3_of_max": within("inexact"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="lrp", help="results' name in bench/: NAME.json and NAME.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.models, args.repeats, Path(tmp))
    info = machine()
    result = {"machine": info, "rows": rows}
    (HERE / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"Host: {info['cpu']} (model {info['cpu_model_number']}), {info['cores']} cores, ISA {info['isa']}; "
        f"oneDNN {info['caffe_onednn_isa']}; OPENBLAS_CORETYPE={info['env_OPENBLAS_CORETYPE']}. N = 1; "
        f"best of {args.repeats} alternated repeats; load: the 1-minute load average before and after the row.",
        "",
        "| model | composite | K | fastsal maps/s | zennit maps/s | speed-up | paired median | exact=False "
        "maps/s | exact=False speed-up | load | within 1e-3 of max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["maps_per_s"]
        lines.append(
            f"| {r['model']} | {r['composite']} | {r['K']} | {m['fastsal']:.2f} | {m['zennit']:.2f} | "
            f"{r['speedup_vs_zennit']:.1f}x | {r['median_paired_speedup']:.1f}x | {m['inexact']:.2f} | "
            f"{r['inexact_speedup_vs_zennit']:.1f}x | {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} | "
            f"{r['within_1e-3_of_max']:.4f} ({r['inexact_within_1e-3_of_max']:.4f}) |"
        )
    (HERE / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
