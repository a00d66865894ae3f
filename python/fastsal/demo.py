"""The demo: saliency of Yahoo's open_nsfw ResNet-50 on scikit-image's sample photos, as PNG overlays, then
the attribution methods side by side for each photo's predicted class.

python -m fastsal.demo --out out
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import fastsal
from fastsal import examples
from fastsal._visualize import overlay


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fastsal.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNG files")
    parser.add_argument(
        "--photos",
        nargs="+",
        default=list(examples.SAMPLE_PHOTOS),
        help="scikit-image sample photos to explain",
    )
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fastsal.set_caffe_log_level(2)  # Caffe's per-layer log lines would bury the result
    prototxt, weights = examples.open_nsfw_files()
    net = fastsal.load(prototxt, weights)
    images, crops, names = examples.open_nsfw_batch(args.photos)

    start = time.perf_counter()
    saliency = fastsal.Saliency(net)
    built = time.perf_counter()
    maps = saliency.compute(images, range(saliency.num_classes))
    done = time.perf_counter()

    net.blobs[saliency.input].reshape(*images.shape)
    probabilities = net.forward(**{saliency.input: images})["prob"].reshape(len(images), -1)

    args.out.mkdir(parents=True, exist_ok=True)
    colormap = plt.get_cmap("inferno")
    columns = ["photo"] + [f"saliency: {c}" for c in examples.OPEN_NSFW_CLASSES]
    figure, axes = plt.subplots(len(names), 3, figsize=(9, 3 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        panels = [crops[row] / 255.0] + [overlay(crops[row], maps[row, k], colormap) for k in range(2)]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel)
            axes[row, col].set_axis_off()
            title = columns[col] if col else f"{name}: P(nsfw) = {probabilities[row, 1]:.2f}"
            axes[row, col].set_title(title, fontsize=9)
        plt.imsave(args.out / f"{name}_saliency_sfw.png", panels[1])
    figure.suptitle("fastsal on open_nsfw (ResNet-50-1by2): |d score / d pixel|, max over colour channels")
    figure.tight_layout()
    grid = args.out / "open_nsfw_saliency.png"
    figure.savefig(grid, dpi=80)

    methods = methods_figure(net, images, crops, names, probabilities.argmax(axis=1), args.out, colormap, plt)
    dreams = dream_figure(net, args.out, plt)

    n_maps = maps.shape[0] * maps.shape[1]
    print(
        f"fastsal: {n_maps} maps ({len(names)} photos x {maps.shape[1]} classes, {maps.shape[2]}x{maps.shape[3]}) "
        f"in {done - built:.2f} s = {n_maps / (done - built):.1f} maps/s on CPU, a first call that also "
        f"allocates the net's memory (engine built in {built - start:.2f} s); wrote {grid}, {methods}, {dreams}"
    )


METHOD_COLUMNS = (  # (title, method, options, signed): the methods people use today, at their usual settings
    ("saliency", "saliency", {}, False),
    ("SmoothGrad (25)", "smoothgrad", {"samples": 25, "seed": 0}, False),
    ("Integrated Gradients (50)", "integrated_gradients", {}, False),
    ("Grad-CAM", "gradcam", {}, False),
    ("guided Grad-CAM", "guided_gradcam", {}, False),
    ("LRP (epsilon_plus_flat)", "lrp", {"composite": "epsilon_plus_flat"}, True),
    ("DeepLIFT (sum)", "deeplift", {"reduce": "sum"}, True),
)


def methods_figure(net, images, crops, names, classes, out: Path, colormap, plt) -> Path:
    """One row per photo: the photo, then each method's map for the photo's predicted class; signed
    relevance (positive red, negative blue) on a diverging colour map centred on zero."""
    figure, axes = plt.subplots(
        len(names),
        len(METHOD_COLUMNS) + 1,
        figsize=(2.4 * (len(METHOD_COLUMNS) + 1), 2.5 * len(names)),
        squeeze=False,
    )
    per_image = np.asarray(classes)[:, None]
    columns = [
        fastsal.Attribution(net, method, **options).compute(images, per_image)[:, 0]
        for _, method, options, _ in METHOD_COLUMNS
    ]
    for row, name in enumerate(names):
        label = examples.OPEN_NSFW_CLASSES[per_image[row, 0]]
        panels = [crops[row] / 255.0] + [
            overlay(crops[row], maps[row], colormap, signed)
            for maps, (*_, signed) in zip(columns, METHOD_COLUMNS)
        ]
        titles = [f"{name} ({label})"] + [title for title, *_ in METHOD_COLUMNS]
        for col, (panel, title) in enumerate(zip(panels, titles)):
            axes[row, col].imshow(panel)
            axes[row, col].set_axis_off()
            axes[row, col].set_title(title, fontsize=9)
    figure.suptitle(
        "fastsal's methods on open_nsfw, for each photo's predicted class (signed: red +, blue -)"
    )
    figure.tight_layout()
    path = out / "open_nsfw_methods.png"
    figure.savefig(path, dpi=80)
    return path


def dream_figure(net, out: Path, plt) -> Path:
    """open_nsfw's two classes visualised (the default: Lucid's parameterisation) and a deep dream of a photo."""
    from skimage.transform import rescale

    preprocessing = fastsal.Preprocessing((3, 224, 224), mean=examples.OPEN_NSFW_MEAN_BGR)
    classes = fastsal.visualize_classes(net, [0, 1], iterations=100, preprocessing=preprocessing)
    photo = rescale(examples.sample_photos(["coffee"])["coffee"] / 255.0, 0.6, channel_axis=2)
    dreamt = fastsal.dream(
        net,
        preprocessing.transform(photo),
        "eltwise_stage1_block3",
        octaves=3,
        iterations=10,
        preprocessing=preprocessing,
    )
    panels = [preprocessing.deprocess(c) for c in classes] + [
        (photo * 255).astype(np.uint8),
        preprocessing.deprocess(dreamt),
    ]
    titles = [f"class: {name}" for name in examples.OPEN_NSFW_CLASSES] + [
        "coffee",
        "dream at eltwise_stage1_block3",
    ]
    widths = [p.shape[1] / p.shape[0] for p in panels]
    figure, axes = plt.subplots(1, 4, figsize=(3.6 * sum(widths), 4.2), gridspec_kw={"width_ratios": widths})
    for ax, panel, title in zip(axes, panels, titles):
        ax.imshow(panel)
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    figure.suptitle("fastsal.visualize_classes and fastsal.dream on open_nsfw")
    figure.tight_layout()
    path = out / "open_nsfw_dream.png"
    figure.savefig(path, dpi=80)
    return path


if __name__ == "__main__":
    main()
