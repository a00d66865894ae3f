"""The perturbation methods: fastsal against their reference libraries on the same weights, in one process.

    .venv/bin/pip install ".[bench]" grad-cam==1.5.7    # torch, captum, pytorch-grad-cam
    OPENBLAS_CORETYPE=SkylakeX .venv/bin/python bench/bench_perturbation.py   # writes perturbation.{json,md}

For each model, method and K (N = 1) it alternates fastsal.Attribution (exact, and exact=False) with
the library as its users call it, one target column per call where the library takes one target:
Captum's Occlusion (a 56x56 window over every channel at stride 28: 49 windows; the ratio does not
depend on the count), RISE's own algorithm in PyTorch (its explanations.py: batches of masked copies,
softmax, one matrix product for every class; the same 160 masks), pytorch-grad-cam's ScoreCAM and
AblationCAM at fastsal's default layer. Reports maps/s, the ratios (of the bests, and the median of
each repeat's back-to-back ratio), the maps' Spearman agreement and the load average at each row's end
(the machine is shared). exact=False runs the perturbation forward in bf16 where the CPU has AMX
(fastsal.build_info()["perturbation_forward"]).
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

import fastsal
from bench_saliency import HERE, SETTLE_S, load_model, machine, spearman
from fastsal._perturbation import rise_masks

CONFIGS = {"open_nsfw": [1, 2], "vgg16": [1, 10]}  # K per model, N = 1
WINDOW = {"sliding_window_shapes": (56, 56), "strides": 28}
N_MASKS, GRID, P1 = 160, 8, 0.5
METHODS = {
    "occlusion": {**WINDOW, "reduce": "none"},
    "rise": {"n_masks": N_MASKS, "grid_size": GRID, "p1": P1, "seed": 0},
    "scorecam": {},
    "ablationcam": {},
}


def library_runner(model, method: str, layer: str | None, images: np.ndarray):
    import torch

    x = torch.from_numpy(images)
    if method == "occlusion":
        from captum.attr import Occlusion

        occlusion = Occlusion(model)
        shape = (images.shape[1], *WINDOW["sliding_window_shapes"])
        stride = (images.shape[1], WINDOW["strides"], WINDOW["strides"])

        def column(targets):
            return occlusion.attribute(
                x, target=torch.from_numpy(targets), sliding_window_shapes=shape, strides=stride
            ).numpy()

    elif method == "rise":
        masks = torch.from_numpy(rise_masks(0, N_MASKS, images.shape[2:], GRID, P1, 0))

        def every_class(_images, classes):  # RISE's explanations.py: every class from one set of forwards
            with torch.no_grad():
                stack = masks[:, None] * x[0]
                p = torch.cat([torch.softmax(model(stack[i : i + 16]), dim=1) for i in range(0, N_MASKS, 16)])
                sal = (p.T @ masks.reshape(N_MASKS, -1)).reshape(-1, *images.shape[2:]) / N_MASKS / P1
            return sal.numpy()[classes][None]

        return every_class
    else:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        library = {"scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}[method]
        cam = getattr(pytorch_grad_cam, library)(model=model, target_layers=[model.module_for(layer)])

        def column(targets):
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets])

    def per_class(_images, classes):  # the images are bound above, as tensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.stack([column(classes[:, k]) for k in range(classes.shape[1])], axis=1)

    return per_class


def run(models, repeats: int, workdir: Path, methods=tuple(METHODS), ks=None) -> list[dict]:
    from fastsal.torch_port import to_torch

    rows = []
    for name in models:
        prototxt, net, score, images = load_model(name, 1, workdir)
        model = to_torch(net, str(prototxt), score)
        for method, options in METHODS.items():
            if method not in methods:
                continue
            ours = fastsal.Attribution(net, method, **options)
            inexact = fastsal.Attribution(net, method, exact=False, **options)
            theirs = library_runner(model, method, ours.layer, images)
            for fn in (ours.compute, inexact.compute, theirs):  # warm up: the engines, oneDNN's kernels
                fn(images, np.zeros((1, 1), np.int64))
            for k in [k for k in CONFIGS[name] if ks is None or k in ks]:
                classes = np.arange(k)[None, :]
                times = {"fastsal": [], "inexact": [], "library": []}
                results = {}
                for _ in range(repeats):
                    for label, fn in (
                        ("fastsal", ours.compute),
                        ("inexact", inexact.compute),
                        ("library", theirs),
                    ):
                        time.sleep(SETTLE_S)
                        start = time.perf_counter()
                        results[label] = fn(images, classes)
                        times[label].append(time.perf_counter() - start)
                best = {label: min(t) for label, t in times.items()}
                row = {
                    "model": name,
                    "method": method,
                    "K": k,
                    "maps_per_s": {label: k / t for label, t in best.items()},
                    "speedup": best["library"] / best["fastsal"],
                    "inexact_speedup": best["library"] / best["inexact"],
                    "paired_speedup": float(np.median(np.divide(times["library"], times["fastsal"]))),
                    "paired_inexact_speedup": float(np.median(np.divide(times["library"], times["inexact"]))),
                    "inexact_spearman": spearman(results["inexact"], results["fastsal"]),
                    "load_average": os.getloadavg()[0],
                    "spearman": spearman(results["fastsal"], results["library"]),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def write_markdown(rows: list[dict], info: dict, path: Path) -> None:
    lines = [
        f"Host: {info['cpu']} (model {info['cpu_model_number']}), {info['cores']} cores, ISA {info['isa']}; "
        f"OPENBLAS_CORETYPE={info['env_OPENBLAS_CORETYPE']}; perturbation forward of exact=False: "
        f"{fastsal.build_info()['perturbation_forward']}. N = 1; best of the repeats, alternated; in "
        "brackets the median of the repeats' back-to-back ratios. Spearman: fastsal (exact) against the "
        "library, and exact=False against exact. Load: the 1-minute load average at the row's end.",
        "",
        "| model | method | K | fastsal maps/s | library maps/s | fastsal / library | inexact maps/s "
        "| inexact / library | Spearman | inexact Spearman | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["maps_per_s"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['K']} | {m['fastsal']:.3f} | {m['library']:.3f} | "
            f"{r['speedup']:.2f}x ({r['paired_speedup']:.2f}x) | {m['inexact']:.3f} | "
            f"{r['inexact_speedup']:.2f}x ({r['paired_inexact_speedup']:.2f}x) | {r['spearman']:.4f} | "
            f"{r['inexact_spearman']:.4f} | {r['load_average']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ks", nargs="+", type=int, help="only these K (of each model's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    info = machine()
    with tempfile.TemporaryDirectory() as workdir:
        rows = run(args.models, args.repeats, Path(workdir), args.methods, args.ks)
    (args.out / "perturbation.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    write_markdown(rows, info, args.out / "perturbation.md")


if __name__ == "__main__":
    main()
