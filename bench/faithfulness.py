"""Are the maps any good? Every method's deletion and insertion AUC and its MPRT similarity on open_nsfw,
and the cascading randomisation picture (Adebayo et al.'s figure: one row per method, one column per
randomised stage).

    OPENBLAS_CORETYPE=SkylakeX .venv/bin/python bench/faithfulness.py    # ~1 h on 2 cores
    .venv/bin/python bench/faithfulness.py --methods deeplift --merge    # add rows to faithfulness.json

The photos: the demo's four (scikit-image's), open_nsfw's own preprocessing (fastsal.examples), each
photo's predicted class. Deletion and insertion follow RISE's protocol (fastsal.metrics) at ``--step``
pixels per step; a uniform random map is the floor every method should beat. MPRT is cascading
randomisation of every layer with parameters, top down (fastsal.metrics.MPRT, seed 42); the table shows
the Spearman rank correlation of |map| with the trained net's after the last layer (a method that passes
the sanity check decorrelates: low), and after the top stage only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import fastsal
from fastsal import examples, metrics

HERE = Path(__file__).resolve().parent
METHODS = {  # row -> (method, options): each at the setting its users start from
    "random map": (None, {}),
    "saliency": ("saliency", {}),
    "input x gradient": ("input_x_gradient", {}),
    "SmoothGrad (25)": ("smoothgrad", {"samples": 25, "seed": 0}),
    "Integrated Gradients (50)": ("integrated_gradients", {}),
    "Grad-CAM": ("gradcam", {}),
    "guided backprop": ("guided_backprop", {}),
    "guided Grad-CAM": ("guided_gradcam", {}),
    "LRP epsilon_plus_flat": ("lrp", {"composite": "epsilon_plus_flat"}),
    "DeepLIFT": ("deeplift", {}),
    "occlusion (15, stride 8)": ("occlusion", {"sliding_window_shapes": (15, 15), "strides": 8}),
    "RISE (1000)": ("rise", {"n_masks": 1000, "seed": 0}),
    "Score-CAM": ("scorecam", {}),
    "Ablation-CAM": ("ablationcam", {}),
}
PICTURE = ("saliency", "SmoothGrad (25)", "Integrated Gradients (50)", "Grad-CAM", "guided backprop",
           "LRP epsilon_plus_flat", "DeepLIFT", "occlusion (15, stride 8)")  # fmt: skip
# Cascading randomisation shown after each stage, top down: the last layer of each stage to randomise.
STAGES = (
    ("fc_nsfw", "fc_nsfw"),
    ("stage 3", "conv_stage3_block0_proj_shortcut"),
    ("stage 2", "conv_stage2_block0_proj_shortcut"),
    ("stage 1", "conv_stage1_block0_proj_shortcut"),
    ("all", "conv_1"),
)


def pixel(maps: np.ndarray) -> np.ndarray:
    """(N, K, H, W) maps: channel-resolved maps summed over channels, as the metrics rank pixels."""
    return maps.sum(axis=2) if maps.ndim == 5 else maps


def method_maps(net, row: str, images, classes) -> np.ndarray:
    method, options = METHODS[row]
    if method is None:
        return np.random.default_rng(0).random((*classes.shape, *images.shape[2:]), dtype=np.float32)
    return pixel(fastsal.Attribution(net, method, **options).compute(images, classes))


def evaluate_row(net, row: str, images, classes, step: int) -> dict:
    method, options = METHODS[row]
    start = time.perf_counter()
    causal = [metrics.Deletion(step=step), metrics.Insertion(step=step)]
    if method is None:  # a random map: no method for MPRT to recompute
        scores = fastsal.evaluate(net, images, classes, causal, maps=method_maps(net, row, images, classes))
    else:  # one evaluate computes the method's maps once for the curves and full randomisation
        every = [*causal, metrics.MPRT(final_only=True)]
        scores = fastsal.evaluate(net, images, classes, every, method=method, **options)
        top = metrics.MPRT(layers=list(net.params)[-1:], final_only=True)
        scores["mprt_top"] = fastsal.evaluate(net, images, classes, [top], method=method, **options)["mprt"]
    keys = ("deletion", "insertion", "mprt_top", "mprt")
    result = {key: scores[key][:, 0].tolist() for key in keys if key in scores}
    result["seconds"] = time.perf_counter() - start
    return result


def cascade_maps(net, rows, image, klass) -> dict[str, list[np.ndarray]]:
    """Each row's map for one image after each stage of cascading randomisation (the first: trained)."""
    copy = metrics.net_copy(net)
    order = list(reversed(list(net.params)))  # top down, as MPRT randomises
    out = {row: [method_maps(copy, row, image, klass)[0, 0]] for row in rows}
    done = 0
    for _, last in STAGES:
        stop = order.index(last) + 1
        for layer in order[done:stop]:
            for blob, values in zip(copy.params[layer], metrics.random_weights(net, layer, 42)):
                blob.data[...] = values
        done = stop
        for row in rows:
            out[row].append(method_maps(copy, row, image, klass)[0, 0])
    return out


def picture(net, rows, image, klass, crop, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = cascade_maps(net, rows, image, klass)
    titles = ["trained"] + [
        f"random down to {name}" if name != "all" else "every layer random" for name, _ in STAGES
    ]
    figure, axes = plt.subplots(
        len(rows), len(titles) + 1, figsize=(1.9 * (len(titles) + 1), 1.9 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        axes[r, 0].imshow(crop)
        axes[r, 0].set_ylabel(row, fontsize=8)
        for c, m in enumerate(maps[row]):
            a = np.abs(m)  # as Adebayo et al. show them: |map| up to its 99th percentile
            top = np.percentile(a, 99)
            axes[r, c + 1].imshow(np.minimum(a / top, 1) if top > 0 else a, cmap="gray", vmin=0, vmax=1)
            if r == 0:
                axes[r, c + 1].set_title(titles[c], fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(
        "Cascading randomisation on open_nsfw, top down (seed 42): |map|, clipped at its 99th percentile",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80, pil_kwargs={"quality": 85})


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        f"open_nsfw, {len(results['photos'])} photos ({', '.join(results['photos'])}), each photo's predicted "
        f"class; deletion and insertion at {results['step']} pixels per step (RISE's protocol), "
        "mean ± standard deviation over the photos. MPRT: Spearman of |map| with the trained net's, after "
        "cascading randomisation of the top layer only and of every layer (seed 42).",
        "",
        "| method | deletion AUC (lower is better) | insertion AUC (higher is better) | MPRT, top layer random "
        "| MPRT, all layers random (lower is better) | seconds (one run, a loaded machine) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values):
        if values is None:
            return "-"
        v = np.asarray(values, dtype=float)
        return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}"

    for row in METHODS:
        if row not in results["rows"]:
            continue
        r = results["rows"][row]
        lines.append(
            f"| {row} | {cell(r['deletion'])} | {cell(r['insertion'])} | {cell(r.get('mprt_top'))} | "
            f"{cell(r.get('mprt'))} | {r['seconds']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--photos", nargs="+", default=list(examples.SAMPLE_PHOTOS))
    parser.add_argument("--step", type=int, default=224, help="pixels per deletion/insertion step")
    parser.add_argument("--merge", action="store_true", help="add these rows to the existing json")
    parser.add_argument("--no-picture", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--picture", type=Path, default=HERE.parent / "docs" / "open_nsfw_mprt.jpg")
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    net = fastsal.load(*examples.open_nsfw_files())
    images, crops, names = examples.open_nsfw_batch(args.photos)
    classes = fastsal.Attribution(net, "saliency").scores(images).argmax(axis=1)[:, None]
    saved = args.out / "faithfulness.json"
    results = json.loads(saved.read_text()) if args.merge and saved.exists() else {"rows": {}}
    results.update(photos=list(names), step=args.step, classes=classes[:, 0].tolist())
    available = [row for row in args.methods if METHODS[row][0] in (None, *fastsal.METHODS)]
    for row in available:
        results["rows"][row] = evaluate_row(net, row, images, classes, args.step)
        print(row, {k: np.round(np.nanmean(v), 3) for k, v in results["rows"][row].items() if k != "seconds"})
        saved.write_text(json.dumps(results, indent=1) + "\n")
    if available:
        write_markdown(results, args.out / "faithfulness.md")
    if not args.no_picture:
        rows = [row for row in PICTURE if METHODS[row][0] in fastsal.METHODS]
        picture(net, rows, images[:1], classes[:1], crops[0], args.picture)
    if available:
        print((args.out / "faithfulness.md").read_text())


if __name__ == "__main__":
    main()
