"""LRP: fastsal against zennit on the same weights (fastsal.torch_port), in one process.

    .venv/bin/pip install ".[bench]" zennit==0.5.1
    .venv/bin/python bench/bench_lrp.py                # ~10 min on 2 cores: writes lrp.{json,md}

For each model and K (N = 1) it alternates fastsal.Attribution(method="lrp") and zennit's Gradient
attributor with the same composite (epsilon_gamma_box for VGG-16, bounds: black and white pixels after
the ImageNet mean; epsilon_plus for open_nsfw, BatchNorm merged into the torch model as fastsal merges
it), one class per zennit call as its users write it. Reports maps/s, the ratio and the agreement.
"""

from __future__ import annotations

import argparse
import json
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
        ours = fastsal.Attribution(net, "lrp", composite=composite, score=score, reduce="none", **options)
        for k in ks:
            classes = np.arange(k)[None, :]

            def theirs(images, classes, model=model, composite=theirs_composite, count=num_classes):
                return zennit_relevance(model, composite, images, classes, count)

            for fn in (ours.compute, theirs):  # warm up: memory, the modified weights
                fn(images, classes[:, :1])
            times = {"fastsal": [], "zennit": []}
            for _ in range(repeats):
                for label, fn in (("fastsal", ours.compute), ("zennit", theirs)):
                    time.sleep(SETTLE_S)
                    start = time.perf_counter()
                    result = fn(images, classes)
                    times[label].append(time.perf_counter() - start)
                    if label == "fastsal":
                        mine = result
                    else:
                        reference = result
            best = {label: min(t) for label, t in times.items()}
            scale = np.abs(reference).reshape(k, -1).max(axis=1)[:, None, None, None]
            rows.append(
                {
                    "model": name,
                    "composite": composite,
                    "K": k,
                    "maps_per_s": {label: k / t for label, t in best.items()},
                    "speedup_vs_zennit": best["zennit"] / best["fastsal"],
                    "within_1e-3_of_max": float((np.abs(mine[0] - reference[0]) <= 1e-3 * scale).mean()),
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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.models, args.repeats, Path(tmp))
    result = {"machine": machine(), "rows": rows}
    (HERE / "lrp.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "| model | composite | K | fastsal maps/s | zennit maps/s | speed-up | within 1e-3 of max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['composite']} | {r['K']} | {r['maps_per_s']['fastsal']:.2f} | "
            f"{r['maps_per_s']['zennit']:.2f} | {r['speedup_vs_zennit']:.1f}x | {r['within_1e-3_of_max']:.4f} |"
        )
    (HERE / "lrp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
