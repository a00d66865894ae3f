"""Class visualisation's parameterisations compared on open_nsfw: what each reaches and whether you can see it.

    .venv/bin/python bench/bench_class_images.py      # ~8 min on 2 cores: writes class_images.{json,md,jpg}

For each setting, open_nsfw's two classes from the same seed and iteration count: the final pre-softmax
score, the score under Lucid's random transformations of the final image (mean of 8; an image that
only works pixel-aligned is an adversarial pattern, not a picture of the class), the standard deviation
of the displayed uint8 image (/255), and the slope of its radially averaged power spectrum (about 0 for
white noise, about -2 for photographs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import fastsal
from fastsal import _imageparam, examples
from fastsal._dream import TRANSFORMS

HERE = Path(__file__).resolve().parent


def power_slope(image: np.ndarray) -> float:
    """Least-squares slope of log power against log radius, over radii 1..min(H, W) / 2 (grey levels)."""
    grey = image.astype(np.float64).mean(axis=2)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    h, w = grey.shape
    y, x = np.indices(grey.shape)
    radius = np.hypot(y - h // 2, x - w // 2).round().astype(int)
    radii = np.arange(1, min(h, w) // 2)
    profile = np.bincount(radius.ravel(), power.ravel())[radii] / np.bincount(radius.ravel())[radii]
    return float(np.polyfit(np.log(radii), np.log(profile + 1e-12), 1)[0])


def transformed_scores(net, images, classes, preprocessing, seed=0, n=8):
    """The class's score over n random Lucid transformations of each final image (grey outside)."""
    engine = fastsal.Saliency(net)
    rng = np.random.default_rng(seed)
    _, h, w = images.shape[1:]
    out = []
    for image, c in zip(images, classes):
        rgb = preprocessing.deprocess(image).astype(np.float32).transpose(2, 0, 1) / 255
        warped = np.stack(
            [
                preprocessing.transform(
                    (
                        _imageparam.apply_affine(
                            _imageparam.random_affine(rng, h, w, **TRANSFORMS), rgb - 0.5
                        )
                        + 0.5
                    )
                    .clip(0, 1)
                    .transpose(1, 2, 0)
                )
                for _ in range(n)
            ]
        )
        scores = np.empty((n, engine.num_classes), np.float32)
        engine._engine.scores(warped, scores)
        out.append(float(scores[:, c].mean()))
    return out


def stretch(display: np.ndarray) -> np.ndarray:
    """Per-image min-max contrast stretch of a uint8 picture."""
    d = display.astype(np.float64)
    return ((d - d.min()) / max(d.max() - d.min(), 1e-9) * 255).round().astype(np.uint8)


SETTINGS = (  # (name, options, contrast stretch for display)
    ("pixel, lr 1 (the old default)", {"parameterization": "pixel"}, False),
    ("pixel, yosinski preset", {"preset": "yosinski"}, False),
    ("pixel, yosinski preset, contrast stretched", {"preset": "yosinski"}, True),
    ("fourier, RGB basis, no transforms", {"transforms": False, "decorrelate": False}, False),
    ("fourier, decorrelated colour, no transforms", {"transforms": False}, False),
    ("fourier, decorrelated colour, transforms (the default)", {}, False),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fastsal.set_caffe_log_level(2)
    net = fastsal.load(*examples.open_nsfw_files())
    preprocessing = fastsal.Preprocessing((3, 224, 224), mean=examples.OPEN_NSFW_MEAN_BGR)
    classes = [0, 1]
    rows, panels, cache = [], [], {}
    identity = np.eye(3)
    for name, options, stretched in SETTINGS:
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            options = dict(options)
            saved = _imageparam.COLOR_CORRELATION
            if not options.pop("decorrelate", True):
                _imageparam.COLOR_CORRELATION = identity  # the spectrum per RGB channel
            try:
                cache[key] = fastsal.visualize_classes(
                    net, classes, iterations=args.iterations, preprocessing=preprocessing, **options
                )
            finally:
                _imageparam.COLOR_CORRELATION = saved
            print(name, "done", flush=True)
        images = cache[key]
        displays = [preprocessing.deprocess(image) for image in images]
        if stretched:
            displays = [stretch(d) for d in displays]
        engine = fastsal.Saliency(net)
        scores = np.empty((len(images), engine.num_classes), np.float32)
        engine._engine.scores(np.ascontiguousarray(images), scores)
        row = {
            "setting": name,
            "score": [float(scores[i, c]) for i, c in enumerate(classes)],
            "classified": bool((scores.argmax(axis=1) == classes).all()),
            "transformed_score": transformed_scores(net, images, classes, preprocessing),
            "display_std": [float(d.std() / 255) for d in displays],
            "power_slope": [power_slope(d) for d in displays],
        }
        rows.append(row)
        panels.append((name, displays))
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "class_images.json").write_text(
        json.dumps({"iterations": args.iterations, "classes": classes, "runs": rows}, indent=1) + "\n"
    )

    def pair(values, fmt):
        return " / ".join(format(v, fmt) for v in values)

    lines = [
        f"open_nsfw, classes sfw / nsfw, {args.iterations} iterations, seed 0.",
        "",
        "| setting | score | score, transformed | display std | power slope |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {pair(r['score'], '.1f')} | {pair(r['transformed_score'], '.1f')} | "
            f"{pair(r['display_std'], '.3f')} | {pair(r['power_slope'], '.2f')} |"
        )
    (args.out / "class_images.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.6))
    for col, (name, displays) in enumerate(panels):
        for row, display in enumerate(displays):
            axes[row, col].imshow(display)
            axes[row, col].set_axis_off()
            axes[row, col].set_title(f"{examples.OPEN_NSFW_CLASSES[row]}: {name}", fontsize=6, wrap=True)
    figure.tight_layout()
    figure.savefig(args.out / "class_images.jpg", dpi=90, pil_kwargs={"quality": 85})


if __name__ == "__main__":
    main()
