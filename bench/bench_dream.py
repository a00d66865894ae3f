"""Deep dream and class visualisation: fastsal against Google's notebook's pycaffe loop, in one run.

    .venv/bin/python bench/bench_dream.py       # ~3 min on 2 cores: writes dream.{json,md}

open_nsfw (its trained weights) and VGG-16 (seeded weights). Dream: the notebook's make_step (a
force_backward copy of the net, forward to the layer, diff = data, backward, the normalised step) against
fastsal.dream, one octave at 224x224, jitter 32, same number of steps; class visualisation: the same
loop seeded with a one-hot at the score, one image per class, against fastsal.visualize_classes with the
K classes as K rows. Alternating, best of --repeats; ms per iteration per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import caffe
import numpy as np

import fastsal
from bench_saliency import HERE, SETTLE_S, load_model, machine

LAYERS = {"open_nsfw": "eltwise_stage2_block1", "vgg16": "conv4_3"}


class NotebookLoop:
    """Google's deepdream notebook's make_step through pycaffe; the objective at `end` or a one-hot."""

    def __init__(self, prototxt: Path, net, workdir: Path):
        path = workdir / f"{prototxt.stem}.force_backward.prototxt"
        path.write_text("force_backward: true\n" + prototxt.read_text())
        self.net = caffe.Net(str(path), caffe.TEST)
        self.net.share_with(net)

    def last(self, blob):
        return [layer for layer, tops in self.net.top_names.items() if blob in tops][-1]

    def dream(self, image, end, steps, rng):
        src = self.net.blobs["data"]
        src.reshape(1, *image.shape)
        self.net.reshape()
        src.data[0] = image
        last = self.last(end)
        for _ in range(steps):
            ox, oy = rng.integers(-32, 33, 2)
            src.data[0] = np.roll(np.roll(src.data[0], ox, -1), oy, -2)
            self.net.forward(end=last)
            dst = self.net.blobs[end]
            dst.diff[:] = dst.data
            self.net.backward(start=last)
            g = src.diff[0]
            src.data[:] += 1.5 / np.abs(g).mean() * g
            src.data[0] = np.roll(np.roll(src.data[0], -ox, -1), -oy, -2)
        return src.data[0].copy()

    def classes(self, shape, classes, score, steps):
        out = []
        last = self.last(score)
        src = self.net.blobs["data"]
        src.reshape(1, *shape)
        self.net.reshape()
        for c in classes:
            src.data[0] = np.random.default_rng([0, int(c)]).standard_normal(shape)
            for _ in range(steps):
                self.net.forward(end=last)
                self.net.blobs[score].diff[...] = 0
                self.net.blobs[score].diff.reshape(1, -1)[0, c] = 1
                self.net.backward(start=last)
                src.data[0] += src.diff[0]
            out.append(src.data[0].copy())
        return np.stack(out)


def timed(times: list, fn, *args, **kwargs):
    time.sleep(SETTLE_S)  # bench_saliency.SETTLE_S: the last method's threads settle
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    times.append(time.perf_counter() - start)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            prototxt, net, score, images = load_model(name, 1, Path(tmp))
            loop = NotebookLoop(prototxt, net, Path(tmp))
            image = images[0]
            classes = list(range(min(args.classes, net.blobs[score].data[0].size)))
            fastsal.dream(net, image, LAYERS[name], octaves=1, iterations=1)  # warm up both
            loop.dream(image, LAYERS[name], 1, np.random.default_rng(0))
            times = {
                key: [] for key in ("notebook_dream", "fastsal_dream", "notebook_classes", "fastsal_classes")
            }
            for _ in range(args.repeats):
                timed(
                    times["notebook_dream"],
                    loop.dream,
                    image,
                    LAYERS[name],
                    args.steps,
                    np.random.default_rng(0),
                )
                timed(
                    times["fastsal_dream"],
                    fastsal.dream,
                    net,
                    image,
                    LAYERS[name],
                    octaves=1,
                    iterations=args.steps,
                )
                timed(times["notebook_classes"], loop.classes, image.shape, classes, score, args.steps)
                timed(
                    times["fastsal_classes"],
                    fastsal.visualize_classes,
                    net,
                    classes,
                    score=score,
                    iterations=args.steps,
                    parameterization="pixel",  # the notebook loop's plain ascent on the pixels
                )
            best = {key: min(t) for key, t in times.items()}
            row = {
                "model": name,
                "layer": LAYERS[name],
                "K": len(classes),
                "ms_per_iteration_per_image": {
                    "notebook_dream": 1000 * best["notebook_dream"] / args.steps,
                    "fastsal_dream": 1000 * best["fastsal_dream"] / args.steps,
                    "notebook_classes": 1000 * best["notebook_classes"] / args.steps / len(classes),
                    "fastsal_classes": 1000 * best["fastsal_classes"] / args.steps / len(classes),
                },
            }
            ms = row["ms_per_iteration_per_image"]
            row["dream_speedup"] = ms["notebook_dream"] / ms["fastsal_dream"]
            row["classes_speedup"] = ms["notebook_classes"] / ms["fastsal_classes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dream.json").write_text(json.dumps({"machine": machine(), "runs": rows}, indent=1) + "\n")
    lines = [
        "| model | dream layer | notebook dream ms/it | fastsal dream ms/it | speedup | K | notebook classes ms/it/image "
        "| fastsal classes ms/it/image | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["ms_per_iteration_per_image"]
        lines.append(
            f"| {r['model']} | {r['layer']} | {m['notebook_dream']:.0f} | {m['fastsal_dream']:.0f} | "
            f"{r['dream_speedup']:.2f}x | {r['K']} | {m['notebook_classes']:.0f} | {m['fastsal_classes']:.0f} | "
            f"{r['classes_speedup']:.2f}x |"
        )
    (args.out / "dream.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
