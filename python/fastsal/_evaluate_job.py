"""``fastsal evaluate``: metrics of a store's maps (fastsal.evaluate), written into the store as
``metrics/<name>`` (image, class) arrays and their curves, chunk by chunk, resumable like ``fastsal run``.
The run's spec is rebuilt from the arguments recorded beside its plan, through jobs' own checks."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _attribution, jobs
from .jobs import MARKERS, OK, JobError, plural

GROUP = "metrics"
SETTINGS = "fastsal_metrics"  # the metrics group's attribute: each metric's settings


def metric_settings(metric) -> dict:
    """A metric object's parameters as JSON (what a rerun compares): its class and its attributes."""
    values = {
        key: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for key, v in vars(metric).items()
    }
    try:
        return json.loads(json.dumps({"class": type(metric).__name__, **values}, sort_keys=True))
    except (TypeError, ValueError):
        raise JobError(f"the {metric.name} metric's settings are not JSON-able: {values}") from None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _marker(out: Path, name: str, chunk: int) -> Path:
    return out / MARKERS / f"metrics-{name}-{chunk:06d}.json"


def _write_marker(out: Path, name: str, chunk: int, content: dict) -> None:
    """Atomic, as jobs' chunk markers: the chunk's metric is finished only once this exists."""
    final = _marker(out, name, chunk)
    temporary = final.parent / f".{final.name}.{os.getpid()}.{threading.get_ident()}"
    with open(temporary, "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)


def _read_marker(out: Path, name: str, chunk: int) -> dict | None:
    try:
        found = json.loads(_marker(out, name, chunk).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _open(output, mode: str):
    """The store as it is on disk: its consolidated copy may predate an array a killed run created."""
    import zarr

    return zarr.open_group(str(output), mode=mode, use_consolidated=False)


def _consolidate(out: Path) -> None:
    import zarr

    with warnings.catch_warnings():  # zarr: consolidated metadata is not in the v3 spec yet
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(out))  # xarray and zarr readers see the new arrays


OWNER = "fastsal_metric"  # each metric array's attribute: the metric that wrote it


def _arrays(group, name: str) -> list[str]:
    """The arrays metric ``name`` wrote: those whose OWNER attribute names it (an array someone else
    put beside them, metrics/deletion_mine, is not the metric's). In a store written before fastsal
    marked them (no array marked as the metric's), they are recognised by name."""
    owners = {key: array.attrs.get(OWNER) for key, array in group.arrays()}
    marked = [key for key, owner in owners.items() if owner == name]
    if marked or name not in owners:
        return marked
    return [
        key for key, owner in owners.items() if owner is None and (key == name or key.startswith(f"{name}_"))
    ]


def _holds(out: Path, group, name: str) -> bool:
    """Whether the store holds any of the metric's results (settings alone, of a run that failed
    before writing, protect nothing)."""
    return bool(_arrays(group, name)) or any((out / MARKERS).glob(f"metrics-{name}-*.json"))


def _remove_metric(out: Path, group, name: str) -> None:
    """--overwrite: the metric's own arrays and markers, nothing else (jobs' rule for fastsal's files)."""
    for array in _arrays(group, name):
        for root, _, files in os.walk(out / GROUP / array, topdown=False):
            for file in files:
                path = os.path.join(root, file)
                if not os.path.islink(path) and jobs._OWN_FILE.fullmatch(os.path.relpath(path, out)):
                    os.unlink(path)
            try:
                os.rmdir(root)
            except OSError:
                pass  # something fastsal did not write: left where it is
    for marker in (out / MARKERS).glob(f"metrics-{name}-*.json"):
        marker.unlink()


@dataclass
class EvaluationSummary:
    metrics: list[str]
    images: int
    evaluated: int  # (image) rows with every metric, OK images of finished chunks
    computed: int  # chunks this run evaluated
    pending_chunks: int  # chunks whose maps are not finished yet
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0

    def line(self, output: str) -> str:
        done = (
            f"{plural(self.computed, 'chunk')} evaluated in {self.seconds:.1f} s"
            if self.computed
            else "all done"
        )
        return f"fastsal: {', '.join(self.metrics)} of {plural(self.evaluated, 'image')} ({done}) -> {output}"


def _differences(metric: str, stored: dict, asked: dict) -> str:
    """Which of a metric's settings differ from those stored, as a user would set them (None: default)."""

    def shown(value) -> str:
        return "default" if value is None else json.dumps(value)

    return "; ".join(
        f"{metric}.{key} {shown(asked.get(key))} asked, {shown(stored.get(key))} stored"
        for key in sorted(stored.keys() | asked.keys())
        if stored.get(key) != asked.get(key)
    )


def evaluate_store(
    output, metrics, *, overwrite=False, batch_size=None, gpu=None, threads=None, quiet=False
) -> EvaluationSummary:
    """Evaluates ``metrics`` (names or fastsal.metrics objects) on the maps of the store at ``output``:
    see the module's docstring. Raises JobError before any work (no store, a store without its run's
    arguments, changed model files or inputs, other settings for a metric already there without
    ``overwrite``), JobUnfinished when chunks of maps are still pending (the finished ones are evaluated)."""

    import fastsal
    from fastsal import metrics as library

    out = Path(output).resolve()
    if not (out.exists() or out.is_symlink()):
        raise JobError(f"no such store: {output}")
    meta = jobs._read_meta(out)
    if meta is None:
        raise JobError(f"{output} is not a fastsal store")
    arguments = meta.get("arguments")
    if not arguments:
        raise JobError(
            f"{output} does not record its run's arguments (made by an older fastsal, or with options that "
            "are no JSON): rerun its fastsal run command once (it resumes, and records them)"
        )
    chosen = [library._metric(item) for item in ([metrics] if isinstance(metrics, str) else metrics)]
    names = [m.name for m in chosen]
    if not chosen or len(set(names)) != len(names):
        raise JobError(f"give each metric once, got {names}")
    settings = {m.name: metric_settings(m) for m in chosen}
    plan = meta["plan"]
    for key in ("model_def", "pretrained_model"):  # a clear word before jobs' generic one
        path = arguments[key]
        if not Path(path).is_file():
            raise JobError(f"the run's model file {path} is gone; fastsal evaluate needs the very model")
        if jobs._sha256(path) != plan[f"{key}_sha256"]:
            raise JobError(
                f"the run's model file {path} changed since the maps were made (its sha256 differs): "
                "fastsal evaluate needs the very model the maps came from"
            )
    options = dict(arguments["options"])
    try:
        spec, attribution, lock = jobs._prepare(
            arguments["images"],
            arguments["model_def"],
            arguments["pretrained_model"],
            str(out),
            overlays=arguments["overlays"],
            batch_size=batch_size,
            gpu=gpu,
            threads=threads,
            **options,
        )
    except JobError as error:
        raise JobError(f"cannot evaluate {output}: {error}") from None
    with lock:
        group = _open(out, "r+")
        metrics_group = group.require_group(GROUP)
        recorded = dict(metrics_group.attrs.get(SETTINGS, {}))
        changed = [n for n in names if n in recorded and recorded[n] != settings[n]]
        held = [n for n in changed if _holds(out, metrics_group, n)]
        if held and not overwrite:
            raise JobError(
                f"{output} holds {', '.join(held)} with other settings ("
                + "; ".join(_differences(n, recorded[n], settings[n]) for n in held)
                + "); give --overwrite to replace them (only those metrics' arrays)"
            )
        for name in held:
            _remove_metric(out, metrics_group, name)
        recorded.update(settings)
        metrics_group.attrs[SETTINGS] = recorded  # before any array or marker: they follow these settings
        _consolidate(out)
        maps_done = jobs.done_chunks(spec.output, spec.chunks)
        todo = {}
        for chunk, summary in sorted(maps_done.items()):
            stamp = {"maps": _digest(summary)}
            missing = [
                m
                for m in chosen
                if _read_marker(out, m.name, chunk) != {**stamp, "settings": _digest(settings[m.name])}
            ]
            if missing:
                todo[chunk] = (missing, stamp)
        net = fastsal.load(spec.model_def, spec.pretrained_model, validate=False)
        engine = {"batch_size": batch_size, "device": gpu, "threads": threads}
        engine |= {key: spec.options[key] for key in library.ENGINE_OPTIONS if key in spec.options}
        method_options = {k: v for k, v in spec.options.items() if k not in library.ENGINE_OPTIONS}
        worker = jobs.Worker(spec, attribution)
        start = time.perf_counter()
        from tqdm import tqdm

        with tqdm(total=len(todo), unit="chunk", disable=True if quiet else None) as progress:
            for chunk, (missing, stamp) in todo.items():
                results = _evaluate_chunk(
                    worker, group, chunk, maps_done[chunk], missing, net, engine, method_options
                )
                _write_chunk(out, metrics_group, spec, chunk, results, missing)
                for metric in missing:  # last: the chunk's metric is finished only now
                    _write_marker(
                        out, metric.name, chunk, {**stamp, "settings": _digest(settings[metric.name])}
                    )
                progress.update(1)
        seconds = time.perf_counter() - start
    evaluated = sum(s["ok"] for s in maps_done.values())
    summary = EvaluationSummary(
        names, spec.count, evaluated, len(todo), spec.chunks - len(maps_done), seconds
    )
    if summary.pending_chunks:
        raise jobs.JobUnfinished(
            f"{plural(summary.pending_chunks, 'chunk')} of maps not finished yet, so not evaluated: finish "
            "the run (fastsal run), then rerun this command"
        )
    return summary


def _evaluate_chunk(worker, group, chunk, marker, missing, net, engine, method_options) -> dict:
    """The metrics of the chunk's OK images, on the inputs decoded as the run did (jobs' Worker.load),
    the stored maps and classes; only images whose file is still the one the run read."""
    from fastsal import metrics as library

    span = worker.spec.chunk_range(chunk)
    batch, good, _, files = worker.load(chunk)
    status = group["status"][span.start : span.stop]
    recorded = marker.get("files", {})
    keep = [
        row
        for row, index in enumerate(good)
        if status[index - span.start] == OK
        and (worker.spec.paths is None or files.get(index) == recorded.get(str(index)))
    ]
    if len(keep) < int((status == OK).sum()):
        raise JobError(
            f"the files of chunk {chunk} changed since its maps were made: rerun fastsal run first (it redoes "
            "that chunk), then this command"
        )
    indices = [good[row] for row in keep]
    results = {"indices": indices}
    if not indices:
        return results
    images = batch[keep]
    rows = slice(span.start, span.stop)
    local = [i - span.start for i in indices]
    classes = group["classes"][rows][local]
    maps = group["maps"][rows][local]
    if maps.shape[-2:] != images.shape[-2:]:
        raise JobError(
            f"the store's maps are {maps.shape[-2:]}, the inputs {images.shape[-2:]}: the metrics need maps "
            "of the input's size (a run with upsample=False cannot be evaluated)"
        )
    stored = [m for m in missing if not m.needs_method]
    recomputed = [m for m in missing if m.needs_method]
    if stored:
        results |= library.evaluate(net, images, classes, stored, method=None, maps=maps, **engine)
    if recomputed:
        results |= library.evaluate(
            net, images, classes, recomputed, method=worker.spec.method, **engine, **method_options
        )
    return results


def _write_chunk(out: Path, metrics_group, spec, chunk, results, missing) -> None:
    """Each per-(image, class) result into its array (created on first use, NaN where not evaluated)."""
    span = spec.chunk_range(chunk)
    rows = [i - span.start for i in results["indices"]]
    created = False
    for key, value in results.items():
        value = np.asarray(value)
        owner = next((m for m in missing if key == m.name or key.startswith(f"{m.name}_")), None)
        if owner is None or value.ndim < 2 or value.shape[:2] != (len(rows), spec.k):
            continue  # a result not per (image, class) (MPRT's layer names), or not this run's metric
        if key not in metrics_group:
            shape = (spec.count, *value.shape[1:])
            dims = (
                "image",
                "class",
                *(f"{key}_point" if d == 2 else f"{key}_axis{d}" for d in range(2, value.ndim)),
            )
            metrics_group.create_array(
                key,
                shape=shape,
                chunks=(spec.chunk_size, *shape[1:]),
                dtype="float32",
                fill_value=np.nan,
                dimension_names=dims,
                attributes={OWNER: owner.name},
            )
            created = True
        array = metrics_group[key]
        if array.shape[1:] != value.shape[1:]:
            raise JobError(f"{out}/{GROUP}/{key} has shape {array.shape}, this chunk's result {value.shape}")
        block = np.full((len(span), *value.shape[1:]), np.nan, np.float32)
        block[rows] = value
        array[span.start : span.stop] = block
    if created:
        _consolidate(out)


def summaries(output) -> dict[str, dict]:
    """Per metric array (N, K) of the store: evaluated (image, class) pairs, mean and quartiles, and the
    settings it was evaluated with where they are not the metric's defaults (as --metric-option sets them)."""
    from fastsal.metrics import METRICS

    group = _open(output, "r")
    if GROUP not in group:
        return {}
    found = {}
    metrics_group = group[GROUP]
    recorded = dict(metrics_group.attrs.get(SETTINGS, {}))
    for key in sorted(metrics_group.array_keys()):
        array = metrics_group[key]
        if array.ndim != 2:
            continue
        values = np.asarray(array[:], np.float64).ravel()
        values = values[np.isfinite(values)]
        quartiles = np.percentile(values, [25, 50, 75]).tolist() if values.size else [np.nan] * 3
        defaults = metric_settings(METRICS[key]()) if key in METRICS else {}
        found[key] = {
            "evaluated": int(values.size),
            "mean": float(values.mean()) if values.size else np.nan,
            "quartiles": quartiles,
            "options": {
                k: v for k, v in recorded.get(key, {}).items() if k != "class" and defaults.get(k) != v
            },
        }
    return found


# ---- integrated_gradients: is the integral converged? ----

DELTA_LIMIT = 0.05  # the relative convergence delta's median above which a run is warned
DELTA_SAMPLE = 4  # images the step count that brings it under is measured on
DELTA_MAX_STEPS = 3200


def convergence_delta(output) -> dict | None:
    """The store's relative convergence delta (integrated_gradients): its median over the evaluated
    (image, class) pairs, what the run measured (see :func:`check_convergence`) and the warning."""

    group = _open(output, "r")
    if "convergence_delta" not in group:
        return None  # another method, or a store from before the delta was stored
    values = np.asarray(group["convergence_delta"][:], np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"median": None, "warning": None}
    median = float(np.median(values))
    measured = group["convergence_delta"].attrs.get("measured")
    return {"median": median, "measured": measured, "warning": _delta_warning(median, measured)}


def _delta_warning(median: float, measured: dict | None) -> str | None:
    if median <= DELTA_LIMIT:
        return None
    text = (
        f"integrated_gradients: the convergence delta's median is {median:.1%} of |F(x) - F(baseline)| "
        f"(over {DELTA_LIMIT:.0%}): the integral is not converged"
    )
    if not measured or measured.get("median_of_store") != median:
        return text + "; raise --n-steps"
    where = f"measured on {plural(len(measured['images']), 'image')}"
    if measured["median"] <= DELTA_LIMIT:
        return text + f"; --n-steps {measured['n_steps']} brings it to {measured['median']:.1%} ({where})"
    return text + f"; still {measured['median']:.1%} at --n-steps {measured['n_steps']} ({where})"


def check_convergence(spec) -> str | None:
    """After an integrated_gradients run: when the median delta is over 5%, the delta is recomputed for a
    few OK images (fastsal.evaluate's convergence_delta) at doubled n_steps until their median is under
    5%; the count is recorded on the array (status shows it) and the warning returned."""

    import fastsal

    found = convergence_delta(spec.output)
    if not found or found["median"] is None or found["median"] <= DELTA_LIMIT:
        return None
    if found.get("measured") and found["measured"].get("median_of_store") == found["median"]:
        return found["warning"]  # measured by an earlier run of this very store
    group = _open(spec.output, "r+")
    status = group["status"][:]
    chosen = [int(i) for i in np.flatnonzero(status == OK)[:DELTA_SAMPLE]]
    net = fastsal.load(spec.model_def, spec.pretrained_model, validate=False)
    worker = jobs.Worker(spec, _attribution.Attribution(net, spec.method, **spec.options))
    images = {}
    for chunk in sorted({index // spec.chunk_size for index in chosen}):  # decoded exactly as the run did
        batch, good, _, _ = worker.load(chunk)
        images.update(zip(good, batch))
    chosen = [index for index in chosen if index in images]
    if not chosen:
        return found["warning"]
    images = np.stack([images[index] for index in chosen])
    classes = group["classes"].oindex[chosen]
    from fastsal import metrics as library

    options = {k: v for k, v in spec.options.items() if k != "n_steps"}
    n_steps = spec.options.get("n_steps", 50)
    median = found["median"]
    while median > DELTA_LIMIT and n_steps < DELTA_MAX_STEPS:
        n_steps *= 2
        delta = library.evaluate(
            net, images, classes, [], method=spec.method, convergence_delta=True, n_steps=n_steps, **options
        )["convergence_delta"]
        median = float(np.median(delta[np.isfinite(delta)])) if np.isfinite(delta).any() else np.inf
    measured = {"n_steps": n_steps, "median": median, "images": chosen, "median_of_store": found["median"]}
    group["convergence_delta"].attrs["measured"] = measured
    _consolidate(Path(spec.output))
    return _delta_warning(found["median"], measured)
