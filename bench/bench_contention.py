"""fastsal on a busy machine: each subject's speed idle and beside a neighbour process, in one run.

    .venv/bin/python bench/bench_contention.py                      # the default scenarios (~10 min)
    .venv/bin/python bench/bench_contention.py --env GOMP_SPINCOUNT=10000 --out /tmp/spin  # a variant
    .venv/bin/python bench/bench_contention.py --ab GOMP_SPINCOUNT=300000   # + idle speed against that

Subjects: fastsal.compute (exact, the default settings), the seed recipe (pycaffe, OpenBLAS's threads)
and Captum's Saliency on the same weights (when torch and captum are installed). Neighbours: none, a
second process calling fastsal.compute in a loop (what a second job or a Dask worker does), and a
single-threaded busy loop. Every subject and neighbour is its own fresh process, started with the same
environment (--env adds to it), so each loads its libraries as a user's would. A subject warms up, then
reports the best and the median of its timed calls; "kept" is loaded over idle speed of the same
subject in the same run. Results go to bench/contention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = [  # (model, N, K, subject, neighbour)
    *[("open_nsfw", 8, 2, s, n) for n in ("none", "fastsal", "busy") for s in ("fastsal", "seed", "captum")],
    *[("vgg16", 1, 10, s, n) for n in ("none", "busy") for s in ("fastsal", "seed")],
]


def subject(model: str, n: int, k: int, what: str, seconds: float, ready: Path | None) -> None:
    """Times `what` on (n images, k classes) for about `seconds` (a neighbour: until killed)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    import fastsal
    from bench_saliency import CaptumSaliency, SeedRecipe, load_model

    fastsal.set_caffe_log_level(2)
    workdir = Path(tempfile.mkdtemp())
    prototxt, net, score, images = load_model(model, n, workdir)
    classes = np.tile(np.arange(k), (n, 1))
    if what == "fastsal":
        method = fastsal.Saliency(net, score=score).compute
    elif what == "seed":
        method = SeedRecipe(prototxt, net, score, workdir)
    else:
        method = CaptumSaliency(net, prototxt, score, None)
    method(images, classes)  # warm: memory, oneDNN's kernels, the threads
    if ready is not None:  # a neighbour: signal, then run until killed
        ready.write_text("ready")
        while True:
            method(images, classes)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        begin = time.perf_counter()
        method(images, classes)
        times.append(time.perf_counter() - begin)
    print(json.dumps({"calls": len(times), "best_s": min(times), "median_s": float(np.median(times))}))


def busy() -> None:
    ready = Path(sys.argv[-1])
    ready.write_text("ready")
    while True:
        pass


def scenario(model, n, k, what, neighbour, seconds, env) -> dict | None:
    here = [sys.executable, __file__]
    process = None
    with tempfile.TemporaryDirectory() as folder:
        ready = Path(folder) / "ready"
        if neighbour == "fastsal":
            process = subprocess.Popen(
                [*here, "--neighbour", model, str(n), str(k), "fastsal", str(ready)], env=env
            )
        elif neighbour == "busy":
            process = subprocess.Popen([*here, "--busy", str(ready)], env=env)
        try:
            while process is not None and not ready.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"the {neighbour} neighbour died")
                time.sleep(0.1)
            result = subprocess.run(
                [*here, "--subject", model, str(n), str(k), what, str(seconds)],
                env=env,
                capture_output=True,
                text=True,
            )
        finally:
            if process is not None:
                process.kill()
                process.wait()
    if result.returncode != 0:
        if what == "captum" and "ModuleNotFoundError" in result.stderr:
            return None
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def idle_ab(models: list[str], before: dict, rounds: int, seconds: float, env: dict) -> list[dict]:
    """fastsal on an idle machine as it is and with ``before`` added to its environment (what it was),
    in alternating fresh processes: the idle speed the spinning bound costs."""
    rows = []
    for model, n, k in (("open_nsfw", 8, 2), ("vgg16", 1, 10)):
        if model not in models:
            continue
        times: dict = {"now": [], "before": []}
        for _ in range(rounds):
            for label, extra in (("now", {}), ("before", before)):
                found = scenario(model, n, k, "fastsal", "none", seconds, {**env, **extra})
                times[label].append(found)
        best = {label: min(r["best_s"] for r in runs) for label, runs in times.items()}
        median = {
            label: float(sorted(r["median_s"] for r in runs)[len(runs) // 2]) for label, runs in times.items()
        }
        rows.append(
            {
                "model": model,
                "n": n,
                "k": k,
                "before": " ".join(f"{a}={b}" for a, b in before.items()),
                "rounds": rounds,
                "best_s": best,
                "median_s": median,
                "now_over_before_best": best["before"] / best["now"],
                "now_over_before_median": median["before"] / median["now"],
            }
        )
        print(f"{model}: idle speed now / before = {rows[-1]['now_over_before_best']:.3f} (best)", flush=True)
    return rows


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        f"# fastsal beside other work ({results['machine']['cpu']}, {results['machine']['cores']} cores)",
        "",
        f"Environment added: `{results['env'] or 'none'}`. Maps/s from the best call; kept = loaded over idle "
        "(best and median calls).",
        "",
        "| model | N | K | subject | neighbour | maps/s (best) | maps/s (median) | kept (best) | kept (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    idle = {(r["model"], r["subject"]): r for r in results["rows"] if r["neighbour"] == "none"}
    for r in results["rows"]:
        base = idle[(r["model"], r["subject"])]
        maps = r["n"] * r["k"]
        lines.append(
            f"| {r['model']} | {r['n']} | {r['k']} | {r['subject']} | {r['neighbour']} | {maps / r['best_s']:.2f} | "
            f"{maps / r['median_s']:.2f} | {base['best_s'] / r['best_s']:.2f} | {base['median_s'] / r['median_s']:.2f} |"
        )
    if results.get("idle_ab"):
        lines += [
            "",
            "Idle speed now over before (alternating fresh processes; the bound's cost on an idle machine):",
            "",
            "| model | N | K | before | rounds | maps/s now (best) | maps/s before (best) | now / before (best) | now / before (median) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["idle_ab"]:
            maps = r["n"] * r["k"]
            lines.append(
                f"| {r['model']} | {r['n']} | {r['k']} | `{r['before']}` | {r['rounds']} | {maps / r['best_s']['now']:.2f} | "
                f"{maps / r['best_s']['before']:.2f} | {r['now_over_before_best']:.3f} | {r['now_over_before_median']:.3f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per scenario")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for every process")
    parser.add_argument("--models", nargs="+", default=["open_nsfw", "vgg16"])
    parser.add_argument("--pairs", nargs="+", help="only these SUBJECT:NEIGHBOUR pairs, e.g. fastsal:none")
    parser.add_argument(
        "--ab", action="append", default=[], help="NAME=VALUE: also compare idle speed with this setting"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the --ab comparison")
    parser.add_argument("--out", type=Path, default=HERE / "contention")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from bench_saliency import machine

    env = dict(os.environ, **dict(item.split("=", 1) for item in args.env))
    rows = []
    for model, n, k, what, neighbour in SCENARIOS:
        if model not in args.models or (args.pairs and f"{what}:{neighbour}" not in args.pairs):
            continue
        found = scenario(model, n, k, what, neighbour, args.seconds, env)
        if found is None:
            continue
        rows.append({"model": model, "n": n, "k": k, "subject": what, "neighbour": neighbour, **found})
        print(
            f"{model} N={n} K={k} {what:8s} beside {neighbour:8s}: {n * k / found['best_s']:7.2f} maps/s",
            flush=True,
        )
    before = dict(item.split("=", 1) for item in args.ab)
    ab = idle_ab(args.models, before, args.rounds, args.seconds, env) if before else []
    results = {"machine": machine(), "env": " ".join(args.env), "rows": rows, "idle_ab": ab}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out.with_suffix(".md"))


if __name__ == "__main__":
    if "--subject" in sys.argv:
        i = sys.argv.index("--subject")
        model, n, k, what, seconds = sys.argv[i + 1 : i + 6]
        subject(model, int(n), int(k), what, float(seconds), None)
    elif "--neighbour" in sys.argv:
        i = sys.argv.index("--neighbour")
        model, n, k, what, ready = sys.argv[i + 1 : i + 6]
        subject(model, int(n), int(k), what, 0.0, Path(ready))
    elif "--busy" in sys.argv:
        busy()
    else:
        main()
