"""The ``fastsal`` command: a thin argparse layer over fastsal.jobs (run, status), class visualisation
and deep dream. Flag names follow Caffe's python/classify.py, hyphenated."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np

from . import jobs
from ._attribution import METHODS
from ._load import _listed
from .metrics import METRICS


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _pair(text: str) -> tuple[int, int]:
    values = _ints(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH, got {text!r}")
    return tuple(values)


METHOD_FLAGS = {  # flag -> (option name, type, help)
    "--reduce": (
        "reduce",
        str,
        "channel reduction of the maps: absmax (default) or sum; occlusion: mean (default); lrp: sum (default)",
    ),
    "--samples": ("samples", int, "noise samples (smoothgrad, smoothgrad_sq, vargrad; default 25)"),
    "--noise-level": ("noise_level", float, "noise sigma relative to each image's max - min (default 0.15)"),
    "--stdev": ("stdev", float, "absolute noise sigma, instead of --noise-level"),
    "--seed": ("seed", int, "seed of the noise, or of RISE's masks: the same seed gives the same maps"),
    "--n-steps": ("n_steps", int, "integration steps (integrated_gradients; default 50)"),
    "--quadrature": ("quadrature", str, "integrated_gradients' rule (default gausslegendre)"),
    "--layer": ("layer", str, "the blob for gradcam, gradcam++, guided_gradcam, scorecam, ablationcam"),
    "--window": (
        "sliding_window_shapes",
        _pair,
        "occlusion's window HEIGHT,WIDTH over every channel (default 15,15, or the image where smaller)",
    ),
    "--stride": ("strides", int, "occlusion's window stride in pixels (default 8)"),
    "--n-masks": ("n_masks", int, "RISE's random masks (default 4000)"),
    "--grid-size": ("grid_size", int, "RISE's grid cells per side (default 8)"),
    "--p1": ("p1", float, "RISE's probability of keeping a cell (default 0.5)"),
    "--composite": (
        "composite",
        str,
        "lrp's rules (default epsilon_plus); epsilon_gamma_box takes its z-box bounds from the preprocessing",
    ),
}


def add_preprocessing(command) -> None:
    prep = command.add_argument_group("preprocessing (caffe.io.Transformer's order; classify.py's defaults)")
    prep.add_argument(
        "--images-dim", type=_pair, help="resize to H,W before the centre crop (default: the net's input)"
    )
    means = prep.add_mutually_exclusive_group()
    means.add_argument("--mean-file", help="a .binaryproto or .npy mean")
    means.add_argument(
        "--mean-value", type=_floats, help="per-channel mean, after channel swap, e.g. 104,117,123"
    )
    prep.add_argument("--raw-scale", type=float, default=255.0, help="scale of [0, 1] pixels")
    prep.add_argument(
        "--channel-swap",
        type=_ints,
        help="channel order (default: 2,1,0, RGB to BGR, for 3-channel nets; none else)",
    )
    prep.add_argument("--input-scale", type=float, help="scale after mean subtraction")


def add_model(command) -> None:
    command.add_argument("--model-def", required=True, help="the deploy prototxt")
    command.add_argument("--pretrained-model", required=True, help="the trained .caffemodel")


def add_overlay_options(command) -> None:
    look = command.add_argument_group("overlays (one PNG per image and class, at the photo's own size)")
    look.add_argument("--labels", help="class names (captions, CSV): synset_words.txt or one name a line")
    look.add_argument("--cmap", help="matplotlib colour map (default: inferno, or bwr for signed maps)")
    look.add_argument("--alpha", type=float, default=0.7, help="the map's opacity where it is strongest")
    look.add_argument(
        "--outlier-perc", type=float, default=2.0, help="the top percent of |values| saturate the colours"
    )


def overlay_style(args):
    from ._visualize import OverlayStyle

    return OverlayStyle(cmap=args.cmap, alpha=args.alpha, outlier_perc=args.outlier_perc)


def preprocessing_for(args, input_shape, per_channel: bool = False):
    from ._preprocess import Preprocessing, load_mean

    mean = load_mean(args.mean_file) if args.mean_file else args.mean_value
    if mean is not None and per_channel and np.ndim(mean) == 3:
        mean = np.asarray(mean).mean(
            axis=(1, 2)
        )  # dream runs at any size: the mean image's per-channel values
    return Preprocessing(
        tuple(input_shape),
        images_dim=args.images_dim,
        mean=None if mean is None else np.asarray(mean, np.float32),
        raw_scale=args.raw_scale,
        channel_swap=tuple(args.channel_swap)
        if args.channel_swap
        else ((2, 1, 0) if input_shape[0] == 3 else None),  # classify.py's default, where it applies
        input_scale=args.input_scale,
    )


DESCRIPTION = """\
Saliency and attribution maps of Caffe models, from a batched C++ engine.

  fastsal run IMAGES --model-def deploy.prototxt --pretrained-model model.caffemodel -o maps.zarr
  fastsal evaluate maps.zarr --metrics deletion,insertion,mprt [--metric-option mprt.final_only=true]
  fastsal status maps.zarr
  fastsal report maps.zarr [more.zarr ...] --labels synset_words.txt -o report/
  fastsal export maps.zarr --png overlays/ --npy maps/ --csv results.csv --labels synset_words.txt
  fastsal visualize --model-def ... --pretrained-model ... --classes 0,1 -o classes/
  fastsal dream photo.jpg --model-def ... --pretrained-model ... --layer inception_4c/output -o dream.png

Exit codes: 0 done and every image ok; 1 some images failed (fastsal status lists them); 2 refused
before any work (bad model, inputs, options or output); 3 unfinished (chunks pending: rerun to finish);
4 an I/O error (disk full, permissions): rerun when fixed, the job resumes; 130 interrupted (Ctrl-C).
FASTSAL_DEBUG=1 or --debug shows the traceback behind an error.
"""

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNFINISHED, EXIT_IO, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (where there is one), descriptions kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


METRIC_NAMES = tuple(METRICS)
OPTION_HELP = (
    "a metric's option, as fastsal.metrics' classes take them (repeatable), e.g. deletion.step=448, "
    "mprt.similarities=spearman_abs, mprt.final_only=true, road_morf.percentages=10,50,90"
)


def _metric_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown metric {unknown or text!r}; fastsal has: {', '.join(METRIC_NAMES)}"
        )
    return names


def _metric_option(text: str) -> tuple[str, str, object]:
    """METRIC.NAME=VALUE -> (metric, name, value): VALUE read as JSON (448, 0.5, true, [1, 2]), else
    comma-separated items each read so (10,50,90 -> [10, 50, 90]), else the text itself."""
    key, sep, value = text.partition("=")
    metric, dot, name = key.strip().partition(".")
    if not (sep and dot and metric and name.strip()):
        raise argparse.ArgumentTypeError(
            f"expected METRIC.OPTION=VALUE, e.g. deletion.step=448, got {text!r}"
        )
    if metric not in METRIC_NAMES:
        raise argparse.ArgumentTypeError(f"unknown metric {metric!r}; fastsal has: {', '.join(METRIC_NAMES)}")

    def read(item: str):
        try:
            return json.loads(item)
        except ValueError:  # Python's spellings of the booleans too: final_only=True
            return {"True": True, "False": False}.get(item.strip(), item.strip())

    try:
        parsed = json.loads(value)  # as a whole first: [1, 2] or "a,b" is one value
    except ValueError:
        parsed = [read(item) for item in value.split(",")] if "," in value else read(value)
    return metric, name.strip(), parsed


def _metric_objects(names: list[str], settings: list | None) -> list:
    """The metric objects of ``names`` with their --metric-option settings (each option checked by
    the metric's own constructor: its message names what is wrong)."""
    chosen = {name: {} for name in names}
    for metric, name, value in settings or []:
        if metric not in chosen:
            raise ValueError(
                f"--metric-option {metric}.{name}: {metric} is not among the metrics ({', '.join(names)})"
            )
        known = METRICS[metric].keywords()
        if name not in known:
            raise ValueError(f"--metric-option {metric}.{name}: {metric} takes {', '.join(known)}")
        chosen[metric][name] = value
    objects = []
    for metric, options in chosen.items():
        try:
            objects.append(METRICS[metric](**options))
        except (TypeError, ValueError) as error:  # the constructor's reason, named as the user wrote it
            given = ", ".join(f"{metric}.{name}" for name in options)
            raise ValueError(f"--metric-option {given}: {error}" if options else str(error)) from error
    return objects


def parser() -> argparse.ArgumentParser:
    import fastsal

    top = argparse.ArgumentParser(prog="fastsal", description=DESCRIPTION, formatter_class=_Formatter)
    top.add_argument("--version", action="version", version=f"fastsal {fastsal.__version__}")
    top.add_argument("--debug", action="store_true", help="show the traceback behind an error")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, text):
        sub = commands.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    run = command("run", "attribution maps of a dataset on disk, into a Zarr store (resumable)")
    run.add_argument(
        "images", help="a directory (recursive), a glob, a text file of paths, or a .npy of inputs"
    )
    add_model(run)
    run.add_argument("-o", "--output", required=True, help="the Zarr store to write (or resume)")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--classes", type=_ints, help="class ids for every image, e.g. 3,7")
    which.add_argument("--top-k", type=int, help="each image's K best classes (default: 1)")
    which.add_argument("--classes-file", help="one row of K class ids per image, in input order")
    run.add_argument("--method", choices=METHODS, default="saliency", help="the attribution method")
    for flag, (_, kind, text) in METHOD_FLAGS.items():
        run.add_argument(flag, type=kind, help=text)
    add_preprocessing(run)
    run.add_argument("--batch-size", type=int, help="rows per forward pass (default: fit 1 GiB)")
    run.add_argument(
        "--threads",
        type=int,
        help="CPU threads per process (default: FASTSAL_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs "
        "this process may use; with --workers N, that count split between the N workers)",
    )
    run.add_argument(
        "--inexact",
        action="store_true",
        help="exact=False: the forward's convolutions through oneDNN too, faster; maps agree in rank",
    )
    run.add_argument("--gpu", type=int, help="CUDA device (a CUDA build)")
    run.add_argument("--chunk-size", type=int, default=64, help="images per chunk of work and of the store")
    run.add_argument("--overlays", help="also write PNG heat-map overlays into this folder")
    add_overlay_options(run)
    spread = run.add_mutually_exclusive_group()
    spread.add_argument(
        "--workers", type=int, help="a Dask LocalCluster of N worker processes (fastsal[dask])"
    )
    spread.add_argument("--scheduler", help="an existing Dask scheduler, tcp://HOST:PORT (fastsal[dask])")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute: replace the store (only a fastsal store holding nothing else) instead of resuming",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--evaluate",
        type=_metric_names,
        help="after the run, fastsal evaluate these metrics, e.g. deletion,insertion",
    )
    run.add_argument(
        "--metric-option",
        type=_metric_option,
        action="append",
        metavar="METRIC.OPTION=VALUE",
        help=OPTION_HELP,
    )

    evaluation = command("evaluate", "metrics of a store's maps, into the store (resumable; exit 0 / 2 / 3)")
    evaluation.add_argument("output", metavar="STORE", help="the Zarr store fastsal run wrote")
    evaluation.add_argument(
        "--metrics", type=_metric_names, required=True, help="comma-separated: " + ", ".join(METRIC_NAMES)
    )
    evaluation.add_argument(
        "--metric-option",
        type=_metric_option,
        action="append",
        metavar="METRIC.OPTION=VALUE",
        help=OPTION_HELP,
    )
    evaluation.add_argument("--batch-size", type=int, help="rows per forward pass (default: fit 1 GiB)")
    evaluation.add_argument("--threads", type=int, help="CPU threads (default: as fastsal run)")
    evaluation.add_argument("--gpu", type=int, help="CUDA device (a CUDA build)")
    evaluation.add_argument(
        "--overwrite",
        action="store_true",
        help="replace metrics the store holds with other settings (only those)",
    )
    evaluation.add_argument("--quiet", action="store_true", help="no progress bar")

    state = command("status", "what a store holds: done, failed and why, pending (exit 0 / 1 / 3)")
    state.add_argument("output", metavar="OUTPUT", help="the Zarr store fastsal run wrote")

    report = command("report", "a static HTML report of stores over the same images (opens from disk)")
    report.add_argument(
        "stores", nargs="+", metavar="STORE", help="fastsal stores; several: maps side by side"
    )
    report.add_argument("-o", "--output", required=True, help="the report folder (new, empty or a report's)")
    report.add_argument("--labels", help="class names: Caffe's synset_words.txt or one name per line")
    report.add_argument("--overlays", action="append", help="a store's overlays folder (once per store)")
    report.add_argument("--page-size", type=int, help="images per page (default: the store's chunk size)")
    report.add_argument(
        "--map-side", type=int, default=64, help="largest side of a map in the report, pixels"
    )

    export = command("export", "a store's results as files: overlays (PNG), maps (NPY), a table (CSV)")
    export.add_argument("output", metavar="STORE", help="the Zarr store fastsal run wrote")
    export.add_argument("--png", help="folder for <index>_<name>_class<id>.png overlays, one per class")
    export.add_argument("--npy", help="folder for <index>_<name>.npy: the image's (K, H, W) maps")
    export.add_argument(
        "--csv", help="file: path, status, reason, then each class's id, name, score, probability"
    )
    add_overlay_options(export)
    export.add_argument("--quiet", action="store_true", help="no progress bar")

    show = command("visualize", "images that maximise class scores, as PNGs and .npy arrays")
    add_model(show)
    show.add_argument("--classes", type=_ints, required=True, help="class ids, e.g. 0,1")
    show.add_argument(
        "-o", "--output", required=True, help="folder for class_<id>.png and class_<id>.npy (the net's input)"
    )
    show.add_argument(
        "--parameterization",
        choices=["fourier", "pixel"],
        default="fourier",
        help="fourier: Lucid's 1/f spectrum in decorrelated colour, Adam; pixel: plain ascent on the pixels",
    )
    show.add_argument(
        "--transforms",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fourier: the net sees the image randomly scaled, rotated and shifted at each step",
    )
    show.add_argument(
        "--preset",
        choices=["simonyan", "yosinski"],
        help="the paper's pixel-space regularisers (override the flags below)",
    )
    show.add_argument("--iterations", type=int, default=200, help="ascent steps")
    show.add_argument(
        "--learning-rate", type=float, help="step size (default: 0.05 for Adam in fourier, 1.0 in pixel)"
    )
    show.add_argument("--decay", type=float, default=0.0, help="pixel: L2 decay of the image per step")
    show.add_argument("--blur-radius", type=float, default=0.0, help="pixel: Gaussian blur sigma, in pixels")
    show.add_argument("--blur-every", type=int, default=0, help="pixel: blur every N steps (0: never)")
    show.add_argument("--jitter", type=int, default=0, help="pixel: random shift in pixels before each step")
    show.add_argument("--seed", type=int, default=0, help="seed of the start and the random transformations")
    show.add_argument(
        "--overwrite", action="store_true", help="replace class_<id>.png/.npy files already there"
    )
    add_preprocessing(show)

    dream = command("dream", "deep dream of an image, as a PNG")
    dream.add_argument("image", help="the picture to dream on")
    add_model(dream)
    dream.add_argument("--layer", required=True, help="the blob whose L2 norm is raised")
    dream.add_argument("-o", "--output", required=True, help="the PNG to write")
    dream.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    dream.add_argument("--octaves", type=int, default=4, help="image scales, smallest first")
    dream.add_argument("--octave-scale", type=float, default=1.4, help="size ratio between octaves")
    dream.add_argument("--iterations", type=int, default=10, help="steps per octave")
    dream.add_argument("--step-size", type=float, default=1.5, help="step size, relative to mean |gradient|")
    dream.add_argument("--jitter", type=int, default=32, help="random roll in pixels before each step")
    dream.add_argument("--guide", help="an image whose features at --layer guide the dream")
    dream.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    add_preprocessing(dream)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import fastsal

    fastsal.set_caffe_log_level(2)
    debug = args.debug or os.environ.get("FASTSAL_DEBUG", "") not in ("", "0")

    def fail(code: int, message: str) -> int:
        if debug:
            traceback.print_exc()
        print(f"fastsal: {message}", file=sys.stderr)
        return code

    previous, warnings.showwarning = warnings.showwarning, _warning_line
    try:
        return _command(args)
    except jobs.JobInterrupted as stop:
        return fail(
            EXIT_INTERRUPTED,
            f"interrupted after {stop.done} of {jobs.plural(stop.total, 'chunk')}; rerun the same command to resume",
        )
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, "interrupted")
    except jobs.JobUnfinished as error:
        return fail(EXIT_UNFINISHED, f"unfinished: {error}")
    except (jobs.JobError, FileNotFoundError, ValueError, TypeError) as error:
        return fail(EXIT_REFUSED, f"error: {error}")
    except OSError as error:  # disk full, permissions, a vanished mount: the job resumes once fixed
        return fail(EXIT_IO, f"I/O error: {error}; rerun the same command when it is fixed")
    finally:
        warnings.showwarning = previous


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line for the command's user: what the library's own source line would not say."""
    text = str(message).replace("use exact=False", "use --inexact")
    print(f"fastsal: warning: {text}", file=sys.stderr)


def _picture_bounds(args) -> dict:
    """LRP's z-box bounds for ``fastsal run``: the preprocessed values of black and white pixels, one pair
    for every channel alike, per channel (--mean-value) or per pixel (a mean image)."""
    from ._preprocess import Preprocessing, load_mean

    if args.mean_file is not None and args.mean_value is not None:
        raise ValueError("give --mean-file or --mean-value, not both")
    mean = load_mean(args.mean_file) if args.mean_file else args.mean_value
    mean = np.zeros(1, np.float32) if mean is None else np.asarray(mean, np.float32)
    shape = (len(mean), 1, 1) if mean.ndim == 1 else mean.shape
    if shape[0] not in (1, 3):  # Preprocessing's own check would blame the net
        raise ValueError(f"the mean has {shape[0]} channels; pictures give 1 or 3")
    # The channel swap moves no value here: black and white are alike in every channel.
    low, high = Preprocessing(shape, None, mean, args.raw_scale, None, args.input_scale).valid_range()
    if mean.ndim == 3:
        return {"low": low.tolist(), "high": high.tolist()}
    low, high = low[:, 0, 0].tolist(), high[:, 0, 0].tolist()
    return {"low": low[0], "high": high[0]} if len(low) == 1 else {"low": low, "high": high}


def _command(args) -> int:
    if args.command == "status":
        return _status(args.output)
    if args.command == "report":
        from .report import write_report

        index = write_report(
            args.stores,
            args.output,
            labels=args.labels,
            overlays=args.overlays or (),
            page_size=args.page_size,
            map_side=args.map_side,
            quiet=False,
        )
        print(f"fastsal: report of {jobs.plural(len(args.stores), 'store')} -> {index}")
        return EXIT_OK
    if args.command == "export":
        return _export(args)
    if args.command in ("visualize", "dream"):
        return _picture(args)
    if args.command == "evaluate":
        return _evaluate(args.output, args, _metric_objects(args.metrics, args.metric_option))
    if args.metric_option and not args.evaluate:
        raise ValueError("--metric-option sets an option of an --evaluate metric; give --evaluate too")
    metrics = _metric_objects(args.evaluate, args.metric_option) if args.evaluate else None  # checked first
    options = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _, _) in METHOD_FLAGS.items()}
    if options["composite"] == "epsilon_gamma_box":
        options.update(_picture_bounds(args))
    summary = jobs.run_job(
        args.images,
        args.model_def,
        args.pretrained_model,
        args.output,
        classes=args.classes,
        top_k=args.top_k,
        classes_file=args.classes_file,
        method=args.method,
        method_options={k: v for k, v in options.items() if v is not None}
        | ({"exact": False} if args.inexact else {}),
        images_dim=args.images_dim,
        mean_file=args.mean_file,
        mean_value=args.mean_value,
        raw_scale=args.raw_scale,
        channel_swap=args.channel_swap or "default",
        input_scale=args.input_scale,
        batch_size=args.batch_size,
        gpu=args.gpu,
        chunk_size=args.chunk_size,
        overlays=args.overlays,
        labels=args.labels,
        style=overlay_style(args),
        overwrite=args.overwrite,
        threads=args.threads,
        workers=args.workers,
        scheduler=args.scheduler,
        quiet=args.quiet,
    )
    print(summary.line(args.output))
    if metrics:  # after the run: evaluation is its own resumable stage, on a finished store
        _evaluate(args.output, args, metrics)
    return summary.exit_code


def _evaluate(output: str, args, metrics: list) -> int:
    from ._evaluate_job import evaluate_store

    summary = evaluate_store(
        output,
        metrics,
        overwrite=args.overwrite and args.command == "evaluate",
        batch_size=args.batch_size,
        gpu=args.gpu,
        threads=args.threads,
        quiet=args.quiet,
    )
    print(summary.line(output))
    return summary.exit_code


def _picture(args) -> int:
    from PIL import Image

    import fastsal

    from ._preprocess import load_image

    out = Path(args.output)
    if args.command == "visualize":
        files = [out / f"class_{c}.{suffix}" for c in args.classes for suffix in ("png", "npy")]
    else:
        files = [out]
    _refuse_existing(files, args.overwrite)  # before minutes of work, and never a file fastsal did not write
    net = fastsal.load(args.model_def, args.pretrained_model)
    input_shape = net.blobs[net.inputs[0]].data.shape[1:]
    preprocessing = preprocessing_for(args, input_shape, per_channel=args.command == "dream")
    if args.command == "visualize":
        images = fastsal.visualize_classes(
            net,
            args.classes,
            iterations=args.iterations,
            preset=args.preset,
            parameterization=args.parameterization,
            transforms=args.transforms,
            learning_rate=args.learning_rate,
            decay=args.decay,
            blur_radius=args.blur_radius,
            blur_every=args.blur_every,
            jitter=args.jitter,
            seed=args.seed,
            preprocessing=preprocessing,
        )
        out.mkdir(parents=True, exist_ok=True)
        for c, image in zip(args.classes, images):
            Image.fromarray(preprocessing.deprocess(image)).save(out / f"class_{c}.png")
            np.save(out / f"class_{c}.npy", image)  # the float image in the net's input space
        print(f"fastsal: {len(images)} class visualisations (PNG and .npy) -> {out}")
        return 0
    color = input_shape[0] == 3
    image = preprocessing.transform(load_image(args.image, color))
    guide = None if args.guide is None else preprocessing.transform(load_image(args.guide, color))
    dreamt = fastsal.dream(
        net,
        image,
        args.layer,
        octaves=args.octaves,
        octave_scale=args.octave_scale,
        iterations=args.iterations,
        step_size=args.step_size,
        jitter=args.jitter,
        guide=guide,
        seed=args.seed,
        preprocessing=preprocessing,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(preprocessing.deprocess(dreamt)).save(out)
    print(f"fastsal: dream of {args.image} at '{args.layer}' -> {out}")
    return 0


def _refuse_existing(files: list[Path], overwrite: bool) -> None:
    """A picture's output that is already there is the user's: replaced only with --overwrite."""
    there = [str(f) for f in files if f.exists() or f.is_symlink()]
    if there and not overwrite:
        raise jobs.JobError(
            f"{_listed(there)} already exist{'s' if len(there) == 1 else ''}; add --overwrite to replace"
        )
    for f in files:
        if f.is_dir():
            raise jobs.JobError(f"{f} is a folder; choose another output")


def _export(args) -> int:
    import dataclasses

    import zarr

    from . import _export
    from ._labels import read_labels

    if not (args.png or args.npy or args.csv):
        raise jobs.JobError("give --png DIR, --npy DIR or --csv FILE: what to export")
    style = overlay_style(args)
    if args.labels:
        jobs.status(args.output)  # a clear refusal for what is no store, before its arrays are read
        num_classes = zarr.open_group(args.output, mode="r")["scores"].shape[1]
        style = dataclasses.replace(style, labels=tuple(read_labels(args.labels, num_classes)))
    done = _export.export(args.output, args.png, args.npy, args.csv, style, quiet=args.quiet)
    wrote = [
        f"{jobs.plural(done['overlays'], 'overlay')} -> {args.png}" if args.png else "",
        f"{jobs.plural(done['npy'], 'map file')} -> {args.npy}" if args.npy else "",
        f"{jobs.plural(done['rows'], 'row')} -> {args.csv}" if args.csv else "",
    ]
    pending = done["info"]["pending"]
    later = f" ({jobs.plural(pending, 'image')} pending: rerun fastsal run to finish)" if pending else ""
    print(f"fastsal: {'; '.join(w for w in wrote if w)}{later}")
    return EXIT_OK


def _status(output: str) -> int:
    info = jobs.status(output)
    plan = info["plan"]
    seed = plan["options"].get("seed")
    noise = f", seed {seed}" if seed is not None else ""
    print(
        f"{output}: {plan['method']} on {jobs.plural(info['images'], 'image')}, chunk {plan['chunk_size']}{noise}"
    )
    print(f"chunks: {info['chunks_done']} of {info['chunks']} done")
    print(f"images: {info['ok']} ok, {len(info['failed'])} failed, {info['pending']} pending")
    for failure in info["failed"]:
        where = failure["path"] or f"input {failure['index']}"
        print(f"  failed: [{failure['index']}] {where}: {failure['reason']}")
    delta = info.get("convergence_delta")
    if delta and delta["median"] is not None:
        print(
            f"convergence delta (integrated_gradients): median {delta['median']:.2%} of |F(x) - F(baseline)|"
        )
        if delta["warning"]:
            print(f"fastsal: warning: {delta['warning']}", file=sys.stderr)
    for name, found in info.get("metrics", {}).items():
        q1, median, q3 = found["quartiles"]
        options = ", ".join(f"{key}={json.dumps(value)}" for key, value in found.get("options", {}).items())
        print(
            f"metric {name}{f' ({options})' if options else ''}: {found['evaluated']} evaluated, "
            f"mean {found['mean']:.4g}, "
            f"quartiles {q1:.4g} / {median:.4g} / {q3:.4g}"
        )
    if info["pending"] or info["chunks_done"] < info["chunks"]:
        return EXIT_UNFINISHED
    return EXIT_FAILED if info["failed"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
