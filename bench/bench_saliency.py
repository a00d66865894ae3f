"""fastsal against the pure-Python seed recipe, in one process, on the same weights, images and classes.

    .venv/bin/python bench/bench_saliency.py                  # default grid (~15 min on 2 cores)
    .venv/bin/python bench/bench_saliency.py --grid full      # adds the long VGG-16 runs (hours)
    .venv/bin/python bench/bench_saliency.py --models small open_nsfw --repeats 3
    .venv-cuda/bin/python bench/bench_saliency.py --device 0      # on a GPU (CUDA build)

For every (model, N images, K classes) it alternates (a) the seed recipe of the caffe-users thread
(a force_backward net, one forward per image, one backward per class, NumPy abs-max), (b)
fastsal.compute (exact, the default), (c) fastsal's inexact mode (exact=False), and (d) Captum's
Saliency on the same weights in PyTorch (fastsal.torch_port) when torch and captum are installed
(`pip install .[bench]`). The host's CPU, ISA flags and the oneDNN implementation of every primitive
(from DNNL_VERBOSE in a probe process) go into results.json. It reports maps/s (best of --repeats), the ratios, the largest
relative difference of the maps, fastsal's time over the engine floor (Caffe's own layer time for one
forward plus K data-only backwards, timed layer by layer in C++) and over its own layer time (the
overhead outside the layers), and peak memory in fresh processes.
Results go to bench/results.{json,md} and bench/maps_per_s.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import caffe
import numpy as np

import fastsal
from fastsal import examples

HERE = Path(__file__).resolve().parent
GRIDS = {  # model -> [(N, K), ...]
    "quick": {
        "small": [(n, k) for n in (1, 8, 32) for k in (1, 2, 10, 100)],
        "open_nsfw": [(n, k) for n in (1, 8, 32) for k in (1, 2)],
        "vgg16": [(1, 1), (1, 2), (1, 10), (8, 1), (8, 2)],
    },
    "full": {
        "small": [(n, k) for n in (1, 8, 32) for k in (1, 2, 10, 100)],
        "open_nsfw": [(n, k) for n in (1, 8, 32) for k in (1, 2)],
        "vgg16": [(n, k) for n in (1, 8, 32) for k in (1, 2, 10)] + [(1, 100)],
    },
}
SMALL_NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 32 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 64 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool2" top: "fc1" inner_product_param { num_output: 256 weight_filler { type: "xavier" } } }
layer { name: "relu3" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "score" type: "InnerProduct" bottom: "fc1" top: "score" inner_product_param { num_output: 100 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""


# ---- models: (prototxt path, caffe.Net, score blob, images (N_max, C, H, W)) ----


def load_model(name: str, n_max: int, workdir: Path):
    caffe.set_random_seed(0)  # seeded weights from Caffe's own fillers
    if name == "open_nsfw":
        prototxt, weights = examples.open_nsfw_files()
        net, score = fastsal.load(prototxt, weights), "fc_nsfw"
        photos = examples.open_nsfw_batch()[0]
    elif name == "vgg16":
        prototxt = HERE / "vgg16_deploy.prototxt"
        net, score = caffe.Net(str(prototxt), caffe.TEST), "fc8"
        photos = examples.open_nsfw_batch()[0]  # 224x224 BGR minus the ImageNet mean: VGG's preprocessing
    elif name == "small":
        prototxt = workdir / "small.prototxt"
        prototxt.write_text(SMALL_NET)
        net, score = caffe.Net(str(prototxt), caffe.TEST), "score"
        photos = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32) * 50
    else:
        raise ValueError(f"unknown model {name}")
    images = np.resize(photos, (n_max, *photos.shape[1:]))  # the photos, repeated
    return Path(prototxt), net, score, images


class SeedRecipe:
    """The caffe-users thread's recipe through pycaffe, exactly as a user writes it."""

    def __init__(self, prototxt: Path, net: caffe.Net, score: str, workdir: Path):
        path = workdir / f"{prototxt.stem}.force_backward.prototxt"
        path.write_text("force_backward: true\n" + prototxt.read_text())
        self.net = caffe.Net(str(path), caffe.TEST)
        self.net.share_with(net)
        self.score = score
        self.last = [layer for layer, tops in self.net.top_names.items() if score in tops][-1]
        self.input = self.net.inputs[0]

    def __call__(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        net, maps = self.net, np.empty((len(images), classes.shape[1], *images.shape[2:]), np.float32)
        for n, image in enumerate(images):
            net.blobs[self.input].data[0] = image
            net.forward(end=self.last)
            for k, c in enumerate(classes[n]):
                net.blobs[self.score].diff[...] = 0
                net.blobs[self.score].diff.reshape(1, -1)[0, c] = 1
                grad = net.backward(start=self.last)[self.input][0]
                maps[n, k] = np.abs(grad).max(axis=0)
        return maps


class CaptumSaliency:
    """The same weights in PyTorch (fastsal.torch_port, layer by layer), explained with Captum's Saliency
    (abs, max over channels): what a user would switch to."""

    def __init__(self, net: caffe.Net, prototxt: Path, score: str, device: int | None):
        import torch
        from captum.attr import Saliency

        from fastsal.torch_port import to_torch

        self.torch = torch
        self.device = "cpu" if device is None else f"cuda:{device}"
        self.model = to_torch(net, str(prototxt), score).eval().to(self.device)
        self.saliency = Saliency(self.model)

    def __call__(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        maps = np.empty((len(images), classes.shape[1], *images.shape[2:]), np.float32)
        for k in range(classes.shape[1]):
            target = self.torch.from_numpy(classes[:, k].astype(np.int64)).to(self.device)
            maps[:, k] = self.saliency.attribute(x, target=target, abs=True).max(dim=1).values.cpu().numpy()
        return maps


def captum_available() -> bool:
    try:
        import captum  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def largest_relative_difference(maps: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(maps - reference).max() / np.abs(reference).max())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x.ravel())).astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


# Idle OpenMP threads spin for milliseconds after each parallel region (libgomp's default policy) and
# would slow whichever method runs next; between a user's calls they have gone to sleep.
SETTLE_S = 0.01


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks since boot from /proc/stat: on a shared VM, the time the hypervisor gave
    the cores to another guest shows up as steal."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    return ticks[7] if len(ticks) > 7 else 0, sum(ticks[:8])


def timed(seconds: list, method, *args) -> np.ndarray:
    """method(*args), appending its wall time to seconds (after letting the previous method's threads settle)."""
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    result = method(*args)
    seconds.append(time.perf_counter() - start)
    return result


# (method, reference): the ratios the targets are stated in.
PAIRS = [("fastsal", "seed"), ("fastsal", "captum"), ("inexact", "seed"), ("inexact", "captum")]


def run_model(
    name: str, grid: list, repeats: int, with_captum: bool, device: int | None, workdir: Path, progress
) -> list[dict]:
    n_max = max(n for n, _ in grid)
    prototxt, net, score, images_all = load_model(name, n_max, workdir)
    seed = SeedRecipe(prototxt, net, score, workdir)
    fast = fastsal.Saliency(net, score=score, device=device)
    # The floor is measured on the CPU: per-layer wall times of asynchronous GPU kernels mean nothing.
    stock = (
        None
        if device is not None
        else fastsal.Saliency(net, score=score, batch_size=fast.batch_size, fast_layers=False)
    )
    # The inexact mode (exact=False: the forward's convolutions through oneDNN too), CPU only.
    inexact = None if device is not None else fastsal.Saliency(net, score=score, exact=False)
    captum = CaptumSaliency(net, prototxt, score, device) if with_captum and name != "small" else None
    rows = []
    for n, k in grid:
        images = images_all[:n]
        classes = np.tile(np.arange(k) * (fast.num_classes // k), (n, 1)).astype(np.int64)
        fast.compute(images, classes)  # warm: blobs grow to the largest batch once
        if stock:
            stock.compute(images, classes[:, :1])
        if inexact:
            inexact.compute(images, classes)
        if captum:
            captum(images, classes)
        times: dict[str, list] = {"seed": [], "fastsal": [], "inexact": [], "captum": []}
        steal_before, total_before = cpu_ticks()
        for _ in range(repeats):  # alternate, so drifts in the machine hit every method alike
            reference = timed(times["seed"], seed, images, classes)
            maps = timed(times["fastsal"], fast.compute, images, classes)
            if inexact:
                inexact_maps = timed(times["inexact"], inexact.compute, images, classes)
            if captum:
                captum_maps = timed(times["captum"], captum, images, classes)
        steal_after, total_after = cpu_ticks()
        steal = (steal_after - steal_before) / max(total_after - total_before, 1)
        # The floor: Caffe's own layer code for one forward and K data-only backwards, layer by layer.
        floor = sum(t[2] + t[3] for t in stock.profile_layers(images, classes)) if stock else float("nan")
        fast_layer_seconds = (
            sum(t[2] + t[3] for t in fast.profile_layers(images, classes)) if stock else float("nan")
        )
        best = {method: min(ts) for method, ts in times.items() if ts}
        # The median over repeats of each repeat's ratio: a repeat runs its methods back to back, so a
        # slow phase of a shared machine tends to hit both sides of a ratio, unlike two separate bests.
        paired = {
            f"{a}_vs_{b}": float(np.median([tb / ta for ta, tb in zip(times[a], times[b])]))
            for a, b in PAIRS
            if times[a] and times[b]
        }
        row = {
            "model": name,
            "N": n,
            "K": k,
            "batch_size": fast.batch_size,
            "maps_per_s": {method: n * k / t for method, t in best.items()},
            "seconds": best,
            "all_seconds": {method: ts for method, ts in times.items() if ts},
            "paired_speedup": paired,
            "steal_fraction": steal,
            "speedup_vs_seed": best["seed"] / best["fastsal"],
            "max_relative_difference": largest_relative_difference(maps, reference),
            "floor_seconds": floor,
            "fastsal_over_floor": best["fastsal"] / floor,
            "fastsal_over_own_layer_time": best["fastsal"] / fast_layer_seconds,
        }
        if inexact:
            row["inexact_speedup_vs_seed"] = best["seed"] / best["inexact"]
            row["inexact_spearman_min"] = min(
                spearman(inexact_maps[i, j], maps[i, j]) for i in range(n) for j in range(k)
            )
        if captum:
            row["speedup_vs_captum"] = best["captum"] / best["fastsal"]
            row["captum_max_relative_difference"] = largest_relative_difference(captum_maps, reference)
            if inexact:
                row["inexact_speedup_vs_captum"] = best["captum"] / best["inexact"]
        rows.append(row)
        progress.update(1)
        progress.write(format_row(row))
    return rows


def format_row(row: dict) -> str:
    m = row["maps_per_s"]
    text = (
        f"{row['model']:9s} N={row['N']:<3d} K={row['K']:<3d} seed {m['seed']:7.2f}  fastsal {m['fastsal']:7.2f} "
        f"maps/s  x{row['speedup_vs_seed']:.2f}  floor x{row['fastsal_over_floor']:.2f} "
        f"own layers x{row['fastsal_over_own_layer_time']:.2f}  diff {row['max_relative_difference']:.1e}"
        f"  steal {row['steal_fraction']:.0%}"
    )
    if "inexact" in m:
        text += f"  inexact {m['inexact']:.2f} (x{row['inexact_speedup_vs_seed']:.2f} seed)"
    if "captum" in m:
        text += f"  captum {m['captum']:.2f} (fastsal x{row['speedup_vs_captum']:.2f})"
        if "inexact" in m:
            text += f" (inexact x{row['inexact_speedup_vs_captum']:.2f})"
    return text


# ---- memory: peak RSS of a fresh process per configuration ----


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def probe_memory(model: str, method: str, n: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prototxt, net, score, images = load_model(model, n, Path(tmp))
        classes = np.tile([0, 1], (n, 1))
        # ru_maxrss would carry the parent's peak across exec: reset this process's own peak instead.
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        baseline = _status_mb("VmRSS")
        if method == "seed":
            SeedRecipe(prototxt, net, score, Path(tmp))(images, classes)
        else:
            fastsal.Saliency(net, score=score, batch_size=batch_size).compute(images, classes)
        peak = _status_mb("VmHWM")
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak}))


def memory_study(model: str, progress) -> list[dict]:
    rows = []
    configs = [("seed", n, 1) for n in (1, 8, 32)] + [
        ("fastsal", n, b) for n in (1, 8, 32) for b in (1, 4, 16)
    ]
    for method, n, b in configs:
        out = subprocess.run(
            [sys.executable, __file__, "--probe-memory", model, method, str(n), str(b)],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ, GLOG_minloglevel="2"),
        ).stdout
        probe = json.loads(out.strip().splitlines()[-1])
        rows.append(
            {
                "model": model,
                "method": method,
                "N": n,
                "batch_size": b,
                **probe,
                "above_baseline_mb": probe["peak_mb"] - probe["baseline_mb"],
            }
        )
        progress.update(1)
    return rows


# ---- report ----


def probe_dnnl() -> None:
    """Runs VGG-16 once in each mode (under DNNL_VERBOSE=1, set by the caller) so that oneDNN names the
    implementation of every primitive it executes."""
    with tempfile.TemporaryDirectory() as tmp:
        _, net, score, images = load_model("vgg16", 1, Path(tmp))
        for exact in (True, False):
            fastsal.Saliency(net, score=score, exact=exact).compute(images, [0, 1])


def dnnl_implementations() -> dict:
    """{"convolution backward_data": {"jit:avx512_core": count, ...}, ...} from a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--probe-dnnl"],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, DNNL_VERBOSE="1", GLOG_minloglevel="2"),
    ).stdout
    found: dict[str, dict[str, int]] = {}
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) > 6 and fields[0] == "onednn_verbose" and fields[1] == "exec":
            kind = f"{fields[3]} {fields[5]}"
            found.setdefault(kind, {}).setdefault(fields[4], 0)
            found[kind][fields[4]] += 1
    return found


def machine() -> dict:
    fields: dict[str, str] = {}
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:  # the first CPU's fields
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = fastsal._build._cpu_flags()  # the set the SlowBlasWarning reads
    info = {
        "cpu": fields.get("model name", "?"),
        "cpu_model_number": fields.get(
            "model", "?"
        ),  # a VM's "model name" often hides the generation: 143 Sapphire, 207 Emerald Rapids
        "isa": " ".join(
            f
            for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
            if f in flags
        ),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastsal": fastsal.__version__,
        **{f"caffe_{k}": v for k, v in fastsal.build_info().items()},
        # OpenBLAS reads it when it loads: the fix fastsal's SlowBlasWarning names, if it was applied
        "env_OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "onednn_implementations": dnnl_implementations(),
    }
    if captum_available():
        import captum
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), captum=captum.__version__)
    return info


def write_markdown(results: dict, path: Path) -> None:
    beside = {"busy": "Beside a single-threaded busy loop in another process, throughout.\n\n"}
    lines = [
        *([beside[results["beside"]]] if results.get("beside", "none") != "none" else []),
        "| model | N | K | seed maps/s | fastsal maps/s | fastsal / seed | captum maps/s | fastsal / captum "
        "| inexact maps/s | inexact / seed | inexact / captum | inexact Spearman (min) | max rel. diff "
        "| fastsal / floor | fastsal / own layers |",
        "|" + "---|" * 15,
    ]
    for r in results["runs"]:
        m = r["maps_per_s"]
        captum = (f"{m['captum']:.2f} | {r['speedup_vs_captum']:.2f}x") if "captum" in m else "- | -"
        inexact = (
            f"{m['inexact']:.2f} | {r['inexact_speedup_vs_seed']:.2f}x | "
            + (f"{r['inexact_speedup_vs_captum']:.2f}x" if "captum" in m else "-")
            + f" | {r['inexact_spearman_min']:.4f}"
            if "inexact" in m
            else "- | - | - | -"
        )
        lines.append(
            f"| {r['model']} | {r['N']} | {r['K']} | {m['seed']:.2f} | {m['fastsal']:.2f} | "
            f"{r['speedup_vs_seed']:.2f}x | {captum} | {inexact} | {r['max_relative_difference']:.1e} | "
            f"{r['fastsal_over_floor']:.2f} | {r['fastsal_over_own_layer_time']:.2f} |"
        )
    lines += [
        "",
        "Paired: the median over the repeats of each repeat's ratio (its methods ran back to back). CPU "
        "stolen: the share of the row's timed CPU time the hypervisor gave to another guest (/proc/stat).",
        "",
        "| model | N | K | fastsal / seed | fastsal / captum | inexact / seed | inexact / captum | CPU stolen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        paired = r.get("paired_speedup", {})
        cells = " | ".join(
            f"{paired[f'{a}_vs_{b}']:.2f}x" if f"{a}_vs_{b}" in paired else "-" for a, b in PAIRS
        )
        steal = f"{r['steal_fraction']:.0%}" if "steal_fraction" in r else "-"
        lines.append(f"| {r['model']} | {r['N']} | {r['K']} | {cells} | {steal} |")
    if results.get("memory"):
        lines += [
            "",
            "| model | method | N | batch size | peak RSS above the loaded net (MB) |",
            "|---|---|---|---|---|",
        ]
        for r in results["memory"]:
            batch = r["batch_size"] if r["method"] == "fastsal" else "-"
            lines.append(
                f"| {r['model']} | {r['method']} | {r['N']} | {batch} | {r['above_baseline_mb']:.0f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results["runs"]))
    figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = [r for r in results["runs"] if r["model"] == model]
        n = max({r["N"] for r in runs}, key=lambda v: (len({r["K"] for r in runs if r["N"] == v}), v))
        runs = sorted((r for r in runs if r["N"] == n), key=lambda r: r["K"])
        for method, style in (("seed", "o--"), ("fastsal", "o-"), ("inexact", "^-"), ("captum", "s:")):
            points = [(r["K"], r["maps_per_s"][method]) for r in runs if method in r["maps_per_s"]]
            if points:
                ax.plot(*zip(*points), style, label=method)
        ax.set(
            xscale="log", yscale="log", xlabel="K classes per image", ylabel="maps/s", title=f"{model}, N={n}"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.suptitle(f"saliency maps per second, {results['machine']['cores']} CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["small", "open_nsfw", "vgg16"],
        choices=["small", "open_nsfw", "vgg16"],
    )
    parser.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per method; the best counts")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory study")
    parser.add_argument(
        "--device", type=int, default=None, help="CUDA device for all three methods (CUDA build)"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder for results.json, results.md, maps_per_s.png"
    )
    parser.add_argument(
        "--beside",
        choices=["none", "busy"],
        default="none",
        help="busy: a single-threaded busy loop runs in another process throughout (issue 21's busy machine)",
    )
    parser.add_argument("--probe-dnnl", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--probe-memory", nargs=4, metavar=("MODEL", "METHOD", "N", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    fastsal.set_caffe_log_level(2)
    if args.probe_memory:
        model, method, n, b = args.probe_memory
        return probe_memory(model, method, int(n), int(b))
    if args.probe_dnnl:
        return probe_dnnl()

    from tqdm import tqdm

    if args.device is not None:  # the seed recipe runs on the GPU through pycaffe
        caffe.set_mode_gpu()
        caffe.set_device(args.device)
    with_captum = captum_available()
    grid = {m: GRIDS[args.grid][m] for m in args.models}
    results = {
        "machine": machine(),
        "device": args.device,
        "grid": args.grid,
        "repeats": args.repeats,
        "beside": args.beside,
        "runs": [],
        "memory": [],
    }
    total = sum(map(len, grid.values())) + (0 if args.no_memory or args.device is not None else 12)
    # the neighbour starts after the models' loading would have, and lives until every row is timed
    neighbour = (
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.beside == "busy" else None
    )
    try:
        with tempfile.TemporaryDirectory() as tmp, tqdm(total=total, desc="bench", unit="config") as progress:
            for model, configs in grid.items():
                results["runs"] += run_model(
                    model, configs, args.repeats, with_captum, args.device, Path(tmp), progress
                )
            if not args.no_memory and args.device is None:
                results["memory"] = memory_study("open_nsfw", progress)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / "results.md")
    plot(results, args.out / "maps_per_s.png")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
