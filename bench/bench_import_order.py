"""Does the order of `import torch` and `import fastsal` change fastsal's speed? Fresh processes, in turn.

    .venv/bin/python bench/bench_import_order.py      # ~3 min on 2 cores: writes import_order.{json,md}

torch bundles a libgomp, and libgomp fixes its threads' wait policy when it loads: the first import
decides it for the whole process. Each round starts one process per order (torch first, fastsal first,
alternating), and each process times fastsal.compute (exact, the default) at a few grid points, best of
--repeats calls after a warm-up. Best over --rounds per order; the ratio is torch-first / fastsal-first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_saliency import HERE, captum_available, machine

POINTS = [("open_nsfw", 8, 2), ("open_nsfw", 1, 1), ("vgg16", 1, 1), ("vgg16", 8, 1)]

CHILD = """
import sys, json, time, tempfile
from pathlib import Path
if sys.argv[1] == "torch":
    import torch  # noqa: F401
import numpy as np
import fastsal
sys.path.insert(0, sys.argv[2])
from bench_saliency import load_model
fastsal.set_caffe_log_level(2)
model, n, k, repeats = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
_, net, score, images = load_model(model, n, Path(tempfile.mkdtemp()))
saliency = fastsal.Saliency(net, score=score)
classes = np.tile(np.arange(k) * (saliency.num_classes // k), (n, 1))
saliency.compute(images, classes)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    saliency.compute(images, classes)
    times.append(time.perf_counter() - start)
print(json.dumps(min(times)))
"""


def run(order: str, model: str, n: int, k: int, repeats: int) -> float:
    args = [sys.executable, "-c", CHILD, order, str(HERE), model, str(n), str(k), str(repeats)]
    return json.loads(
        subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE)
    options = parser.parse_args()
    if not captum_available():
        sys.exit("needs torch: pip install .[bench]")
    rows = []
    for model, n, k in POINTS:
        best = {"torch": float("inf"), "fastsal": float("inf")}
        for _ in range(options.rounds):
            for order in ("torch", "fastsal"):
                best[order] = min(best[order], run(order, model, n, k, options.repeats))
        row = {
            "model": model,
            "N": n,
            "K": k,
            "fastsal_first_s": best["fastsal"],
            "torch_first_s": best["torch"],
        }
        row["torch_first_over_fastsal_first"] = best["torch"] / best["fastsal"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "import_order.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    lines = [
        "| model | N | K | fastsal first (s) | torch first (s) | torch first / fastsal first |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['N']} | {r['K']} | {r['fastsal_first_s']:.3f} | {r['torch_first_s']:.3f} "
        f"| {r['torch_first_over_fastsal_first']:.2f} |"
        for r in rows
    ]
    (options.out / "import_order.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
