"""Are the maps any good? Every method's deletion and insertion AUC and its MPRT similarity on open_nsfw
or on a digits CNN, and the cascading randomisation picture (Adebayo et al.'s figure: one row per
method, one column per randomised stage).

    OPENBLAS_CORETYPE=SkylakeX .venv/bin/python bench/faithfulness.py    # ~1 h on 2 cores
    .venv/bin/python bench/faithfulness.py --methods deeplift --merge    # add rows to faithfulness.json
    OPENBLAS_CORETYPE=SkylakeX .venv/bin/python bench/faithfulness.py --model digits   # ~5 min

open_nsfw: the demo's four photos (scikit-image's), open_nsfw's own preprocessing (fastsal.examples),
each photo's predicted class. digits (faithfulness_digits.*): fastsal.examples.digits_net, a small CNN
that Caffe's solver trains on scikit-learn's digits (about 15 s), on the first ``--images`` (100)
held-out digits (32 x 32, ink in [0, 1]: deletion's baseline 0 is blank paper), each one's predicted
class. Deletion and insertion follow RISE's protocol (fastsal.metrics) at ``--step``
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
# The digits are 32 x 32: occlusion's window scaled as open_nsfw's 15 of 224 would leave 2 pixels, a
# stroke's width is about 4; 5 x 5 at stride 2. Every other method applies to the 1-channel net as is.
DIGITS_METHODS = {row: value for row, value in METHODS.items() if value[0] != "occlusion"}
DIGITS_METHODS["occlusion (5, stride 2)"] = ("occlusion", {"sliding_window_shapes": (5, 5), "strides": 2})
MODEL_METHODS = {"open_nsfw": METHODS, "digits": DIGITS_METHODS}
PICTURE = ("saliency", "SmoothGrad (25)", "Integrated Gradients (50)", "Grad-CAM", "guided backprop",
           "LRP epsilon_plus_flat", "DeepLIFT")  # fmt: skip
# Cascading randomisation shown after each stage, top down: the last layer of each stage to randomise.
STAGES = {
    "open_nsfw": (
        ("fc_nsfw", "fc_nsfw"),
        ("stage 3", "conv_stage3_block0_proj_shortcut"),
        ("stage 2", "conv_stage2_block0_proj_shortcut"),
        ("stage 1", "conv_stage1_block0_proj_shortcut"),
        ("all", "conv_1"),
    ),
    "digits": (("fc", "fc"), ("conv2", "conv2"), ("all", "conv1")),
}


ROWS = {**METHODS, **DIGITS_METHODS}  # row -> (method, options), either model's


def pixel(maps: np.ndarray) -> np.ndarray:
    """(N, K, H, W) maps: channel-resolved maps summed over channels, as the metrics rank pixels."""
    return maps.sum(axis=2) if maps.ndim == 5 else maps


def method_maps(net, row: str, images, classes) -> np.ndarray:
    method, options = ROWS[row]
    if method is None:
        return np.random.default_rng(0).random((*classes.shape, *images.shape[2:]), dtype=np.float32)
    return pixel(fastsal.Attribution(net, method, **options).compute(images, classes))


def evaluate_row(net, row: str, images, classes, step: int) -> dict:
    method, options = ROWS[row]
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


def cascade_maps(net, rows, image, klass, stages) -> dict[str, list[np.ndarray]]:
    """Each row's map for one image after each stage of cascading randomisation (the first: trained)."""
    copy = metrics.net_copy(net)
    order = list(reversed(list(net.params)))  # top down, as MPRT randomises
    out = {row: [method_maps(copy, row, image, klass)[0, 0]] for row in rows}
    done = 0
    for _, last in stages:
        stop = order.index(last) + 1
        for layer in order[done:stop]:
            for blob, values in zip(copy.params[layer], metrics.random_weights(net, layer, 42)):
                blob.data[...] = values
        done = stop
        for row in rows:
            out[row].append(method_maps(copy, row, image, klass)[0, 0])
    return out


def picture(net, model: str, rows, image, klass, crop, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = STAGES[model]
    maps = cascade_maps(net, rows, image, klass, stages)
    titles = ["trained"] + [
        f"random down to {name}" if name != "all" else "every layer random" for name, _ in stages
    ]
    figure, axes = plt.subplots(
        len(rows), len(titles) + 1, figsize=(1.9 * (len(titles) + 1), 1.9 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        axes[r, 0].imshow(crop, cmap="gray" if crop.ndim == 2 else None)
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
        f"Cascading randomisation on {model}, top down (seed 42): |map|, clipped at its 99th percentile",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80, pil_kwargs={"quality": 85})


def write_markdown(results: dict, path: Path) -> None:
    if "photos" in results:
        what, over = f"open_nsfw, {len(results['photos'])} photos ({', '.join(results['photos'])})", "photos"
    else:
        what = (
            f"the digits CNN ({results['accuracy']:.1%} of {results['test_digits']} held-out digits right), "
            f"the first {results['images']} held-out digits"
        )
        over = "digits"
    lines = [
        f"{what}, each one's predicted class; deletion and insertion at {results['step']} pixels per step "
        f"(RISE's protocol), mean ± standard deviation over the {over}. MPRT: Spearman of |map| with the "
        "trained net's, after cascading randomisation of the top layer only and of every layer (seed 42).",
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

    for row in ROWS:
        if row not in results["rows"]:
            continue
        r = results["rows"][row]
        lines.append(
            f"| {row} | {cell(r['deletion'])} | {cell(r['insertion'])} | {cell(r.get('mprt_top'))} | "
            f"{cell(r.get('mprt'))} | {r['seconds']:.{0 if r['seconds'] >= 10 else 1}f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(MODEL_METHODS), default="open_nsfw")
    parser.add_argument("--methods", nargs="*", choices=list(ROWS), help="rows (default: all the model's)")
    parser.add_argument("--photos", nargs="+", default=list(examples.SAMPLE_PHOTOS), help="open_nsfw's")
    parser.add_argument("--images", type=int, default=100, help="held-out digits (--model digits)")
    parser.add_argument("--step", type=int, help="pixels per deletion/insertion step (default: a row)")
    parser.add_argument("--merge", action="store_true", help="add these rows to the existing json")
    parser.add_argument("--no-picture", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--picture", type=Path, help="default: docs/{model}_mprt.jpg")
    args = parser.parse_args(argv)
    methods = MODEL_METHODS[args.model]
    args.methods = list(methods) if args.methods is None else args.methods
    if [row for row in args.methods if row not in methods]:
        parser.error(f"--model {args.model} has the rows {', '.join(methods)}")
    picture_path = args.picture or HERE.parent / "docs" / f"{args.model}_mprt.jpg"
    fastsal.set_caffe_log_level(2)
    if args.model == "open_nsfw":
        net = fastsal.load(*examples.open_nsfw_files())
        images, crops, names = examples.open_nsfw_batch(args.photos)
        about = {"photos": list(names)}
        stem = "faithfulness"
    else:
        start = time.perf_counter()
        net = fastsal.load(*examples.digits_net())  # trained once, then from fastsal's cache
        _, _, test_images, test_labels = examples.digits_data()
        predicted = fastsal.Attribution(net, "saliency").scores(test_images).argmax(axis=1)
        accuracy = float(np.mean(predicted == test_labels))
        print(
            f"digits net: {accuracy:.1%} of {len(test_labels)} held-out digits ({time.perf_counter() - start:.0f} s)"
        )
        images, crops = test_images[: args.images], test_images[: args.images, 0]
        about = {"images": len(images), "test_digits": len(test_labels), "accuracy": accuracy}
        stem = "faithfulness_digits"
    step = args.step or images.shape[-1]
    classes = fastsal.Attribution(net, "saliency").scores(images).argmax(axis=1)[:, None]
    saved = args.out / f"{stem}.json"
    results = json.loads(saved.read_text()) if args.merge and saved.exists() else {"rows": {}}
    results.update(about, step=step, classes=classes[:, 0].tolist())
    available = [row for row in args.methods if ROWS[row][0] in (None, *fastsal.METHODS)]
    for row in available:
        results["rows"][row] = evaluate_row(net, row, images, classes, step)
        print(row, {k: np.round(np.nanmean(v), 3) for k, v in results["rows"][row].items() if k != "seconds"})
        saved.write_text(json.dumps(results, indent=1) + "\n")
    if available:
        write_markdown(results, args.out / f"{stem}.md")
    if not args.no_picture:
        occlusion = [row for row, (method, _) in methods.items() if method == "occlusion"]
        rows = [row for row in (*PICTURE, *occlusion) if ROWS[row][0] in fastsal.METHODS]
        picture(net, args.model, rows, images[:1], classes[:1], crops[0], picture_path)
    if available:
        print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
