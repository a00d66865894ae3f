"""Jobs: a dataset on disk in, maps on disk out (a Zarr v3 store), chunk by chunk, resumable, on one
machine or a Dask cluster. ``fastsal run`` and ``fastsal status`` (fastsal.cli) are thin layers over
:func:`run_job` and :func:`status`.

The store: ``maps`` (N, K, H, W) float32, ``classes`` (N, K) int32, ``scores`` (N, num_classes) float32,
``status`` (N,) int8 (0 pending, 1 ok, 2 failed), ``paths`` (N,) str, all chunked along N by the job's
chunk; its attributes hold the plan (model hashes, preprocessing, inputs, classes, method, chunk size)
and fastsal's version. A chunk is finished when its marker ``.fastsal/chunk-<i>.json`` exists, written
atomically after the chunk's data (with the failed images' reasons): a rerun with the same plan does only
the chunks without one, whatever a kill left half-written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _attribution
from ._preprocess import ImageError, Preprocessing, load_image, load_mean

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
PENDING, OK, FAILED = 0, 1, 2
MARKERS = ".fastsal"


class JobError(ValueError):
    """A job refused before any work: bad model, mean, classes, inputs or output."""


@dataclass
class JobSpec:
    """Everything a worker needs to do any chunk of the job (picklable, sent once per worker)."""

    output: str
    model_def: str
    pretrained_model: str
    paths: list[str] | None  # image files, or None with array
    array: str | None  # a .npy of preprocessed (N, C, H, W) inputs
    count: int
    preprocessing: Preprocessing | None
    classes: np.ndarray | None  # (N, K) per image, or None with top_k
    top_k: int | None
    k: int
    method: str
    options: dict
    batch_size: int | None
    gpu: int | None
    chunk_size: int
    overlays: str | None = None
    plan: dict = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        return -(-self.count // self.chunk_size)

    def chunk_range(self, chunk: int) -> range:
        """The input indices of one chunk."""
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.count))


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_inputs(images) -> tuple[list[str] | None, str | None]:
    """(paths, None) for a directory (recursive, image suffixes), a glob or a text file of paths; or
    (None, path) for a .npy array of preprocessed inputs."""
    text = str(images)
    path = Path(text)
    if path.is_dir():
        paths = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file() and path.suffix == ".npy":
        return None, str(path.resolve())
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        paths = [text]
    elif path.is_file():
        base = path.parent
        lines = [line.strip() for line in path.read_text().splitlines()]
        paths = [str(base / line) if not os.path.isabs(line) else line for line in lines if line]
    else:
        paths = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
    if not paths:
        raise JobError(f"no images found in {text!r} (a directory, a glob, a text file of paths or a .npy)")
    return paths, None


def _classes_from_file(path, count: int) -> np.ndarray:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append([int(v) for v in line.replace(",", " ").split()])
        except ValueError:
            raise JobError(f"{path}:{number}: expected class ids (integers), got {line!r}") from None
    if len(rows) != count or len({len(r) for r in rows}) != 1:
        raise JobError(f"{path} must hold one row of K class ids per image: {count} images, {len(rows)} rows")
    return np.array(rows, np.int32)


def _open_store(output: str, mode: str):
    import zarr

    return zarr.open_group(output, mode=mode)


class Worker:
    """The model loaded once per process; decodes, explains and writes any chunk of the job."""

    def __init__(self, spec: JobSpec, attribution: _attribution.Attribution | None = None):
        import fastsal

        self.spec = spec
        if attribution is None:  # a Dask worker: the client checked the model already
            net = fastsal.load(spec.model_def, spec.pretrained_model, validate=False)
            attribution = _attribution.Attribution(
                net, spec.method, batch_size=spec.batch_size, device=spec.gpu, **spec.options
            )
        self.attribution = attribution
        self.decoders = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
        self._array = None
        self._store = None

    def load(self, chunk: int):
        """(inputs (n_ok, C, H, W), indices of those, {index: reason}, crops for overlays)."""
        indices = list(self.spec.chunk_range(chunk))
        if self.spec.array is not None:
            if self._array is None:
                self._array = np.load(self.spec.array, mmap_mode="r")
            batch = np.asarray(self._array[indices[0] : indices[-1] + 1], np.float32)
            finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
            failed = {i: "contains NaN or Inf" for i, ok in zip(indices, finite) if not ok}
            good = [i for i in indices if i not in failed]
            return batch[finite], good, failed, None
        preprocessing = self.spec.preprocessing

        def decode(index):
            try:
                image = load_image(self.spec.paths[index], color=preprocessing.input_shape[0] == 3)
                crop = preprocessing.crop(image) if self.spec.overlays else None
                return preprocessing(image), crop, None
            except ImageError as error:
                return None, None, str(error)
            except OSError as error:
                return None, None, f"cannot read: {error}"

        results = list(self.decoders.map(decode, indices))
        failed = {i: r[2] for i, r in zip(indices, results) if r[2] is not None}
        good = [i for i, r in zip(indices, results) if r[2] is None]
        inputs = [r[0] for r in results if r[2] is None]
        crops = [r[1] for r in results if r[2] is None]
        shape = self.attribution.image_shape
        batch = np.stack(inputs) if inputs else np.empty((0, *shape), np.float32)
        return batch, good, failed, crops

    def compute(self, loaded):
        """Maps, classes and scores of the chunk's good images; an image the engine refuses (its
        activations overflow) is moved to the failed ones with the engine's reason."""
        batch, good, failed, crops = loaded
        classes = None if self.spec.classes is None else self.spec.classes
        results = {}
        try:
            if len(batch):
                results = dict(zip(good, zip(*self._explain(batch, good, classes))))
        except ValueError:  # one image's overflow: find it, keep the rest
            for row, index in enumerate(good):
                try:
                    maps, ids, scores = self._explain(batch[row : row + 1], [index], classes)
                    results[index] = (maps[0], ids[0], scores[0])
                except ValueError as error:
                    failed[index] = str(error).replace("images[0]", f"image {index}")
        keep = [i for i in good if i in results]
        crops = None if crops is None else [c for i, c in zip(good, crops) if i in results]
        return results, keep, failed, crops

    def _explain(self, batch, indices, classes):
        rows = None if classes is None else classes[indices]
        return self.attribution.explain(batch, rows, self.spec.top_k)

    def write(self, chunk: int, computed) -> dict:
        results, keep, failed, crops = computed
        if self._store is None:
            self._store = _open_store(self.spec.output, "r+")
        store, span = self._store, self.spec.chunk_range(chunk)
        n, k = len(span), self.spec.k
        maps = np.full((n, k, *store["maps"].shape[2:]), np.nan, np.float32)
        ids = np.full((n, k), -1, np.int32)
        scores = np.full((n, store["scores"].shape[1]), np.nan, np.float32)
        state = np.full(n, FAILED, np.int8)
        for index in keep:
            row = index - span.start
            maps[row], ids[row], scores[row] = results[index]
            state[row] = OK
        block = slice(span.start, span.stop)
        store["maps"][block] = maps
        store["classes"][block] = ids
        store["scores"][block] = scores
        store["status"][block] = state
        if self.spec.overlays and crops:
            self._write_overlays(keep, crops, results)
        summary = {"chunk": chunk, "ok": len(keep), "failed": {str(i): r for i, r in sorted(failed.items())}}
        _write_marker(self.spec.output, chunk, summary)  # last: the chunk is finished only now
        return summary

    def _write_overlays(self, keep, crops, results):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ._visualize import overlay

        folder = Path(self.spec.overlays)
        folder.mkdir(parents=True, exist_ok=True)
        colormap = plt.get_cmap("inferno")
        for index, crop in zip(keep, crops):
            maps, ids, _ = results[index]
            photo = (np.clip(crop, 0, 1) * 255).astype(np.uint8)
            if photo.shape[2] == 1:
                photo = np.repeat(photo, 3, axis=2)
            stem = Path(self.spec.paths[index]).stem
            plt.imsave(folder / f"{index:06d}_{stem}_class{ids[0]}.png", overlay(photo, maps[0], colormap))

    def process(self, chunk: int) -> dict:
        return self.write(chunk, self.compute(self.load(chunk)))


def _write_marker(output: str, chunk: int, summary: dict) -> None:
    folder = Path(output) / MARKERS
    folder.mkdir(exist_ok=True)
    temporary = folder / f".chunk-{chunk:06d}.json.{os.getpid()}.{threading.get_ident()}"
    with open(temporary, "w") as f:
        json.dump(summary, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, folder / f"chunk-{chunk:06d}.json")


def done_chunks(output: str) -> dict[int, dict]:
    folder = Path(output) / MARKERS
    if not folder.is_dir():
        return {}
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in folder.glob("chunk-*.json")}


def prepare(images, model_def, pretrained_model, output, **options) -> JobSpec:
    """Checks everything and writes the plan (see :func:`_prepare`); returns the job's spec."""
    return _prepare(images, model_def, pretrained_model, output, **options)[0]


def _prepare(
    images,
    model_def,
    pretrained_model,
    output,
    *,
    classes=None,
    top_k=None,
    classes_file=None,
    method="saliency",
    method_options=None,
    images_dim=None,
    mean_file=None,
    mean_value=None,
    raw_scale=255.0,
    channel_swap=(2, 1, 0),
    input_scale=None,
    batch_size=None,
    gpu=None,
    chunk_size=64,
    overlays=None,
    overwrite=False,
) -> tuple[JobSpec, _attribution.Attribution]:
    """Checks everything and writes the plan: the store exists, empty or partly done, when it returns.
    Raises JobError (or FileNotFoundError) before any work for a bad model, mean, classes, inputs or
    output. Returns the spec and the checked model's Attribution, which the local run reuses."""
    import fastsal

    options = dict(method_options or {})
    if options.get("reduce") == "none":
        raise JobError("jobs write maps: reduce must be 'absmax' or 'sum'")
    if sum(x is not None for x in (classes, top_k, classes_file)) > 1:
        raise JobError("give one of classes, top_k or classes_file")
    if chunk_size < 1:
        raise JobError(f"chunk_size must be positive, got {chunk_size}")
    for path in (model_def, pretrained_model):
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file not found: {path}")
    paths, array = list_inputs(images)
    net = fastsal.load(model_def, pretrained_model)  # a broken model raises here, in a child process
    try:
        attribution = _attribution.Attribution(net, method, batch_size=batch_size, device=gpu, **options)
    except TypeError as error:
        raise JobError(str(error)) from None
    c, h, w = attribution.image_shape
    if array is not None:
        shape = np.load(array, mmap_mode="r").shape
        if len(shape) != 4 or shape[1:] != (c, h, w):
            raise JobError(
                f"{array} holds shape {shape}; the net takes preprocessed (N, {c}, {h}, {w}) inputs"
            )
        count, preprocessing = shape[0], None
    else:
        count = len(paths)
        if mean_file is not None and mean_value is not None:
            raise JobError("give mean_file or mean_value, not both")
        mean = load_mean(mean_file) if mean_file is not None else mean_value
        try:
            preprocessing = Preprocessing(
                (c, h, w),
                images_dim=None if images_dim is None else tuple(images_dim),
                mean=None if mean is None else np.asarray(mean, np.float32),
                raw_scale=raw_scale,
                channel_swap=None if channel_swap is None else tuple(channel_swap),
                input_scale=input_scale,
            )
        except ValueError as error:
            raise JobError(str(error)) from None
    if classes_file is not None:
        per_image = _classes_from_file(classes_file, count)
    elif classes is not None:
        ids = np.atleast_1d(np.asarray(classes))
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise JobError(f"classes must be a list of class ids, got {classes!r}")
        per_image = np.broadcast_to(ids.astype(np.int32), (count, ids.size))
    else:
        per_image = None
        top_k = 1 if top_k is None else top_k
        if not 1 <= top_k <= attribution.num_classes:
            raise JobError(f"top_k must be in 1..{attribution.num_classes}, got {top_k}")
    if per_image is not None:
        bad = (per_image < 0) | (per_image >= attribution.num_classes)
        if bad.any():
            raise JobError(
                f"class {int(per_image[bad][0])} is out of range: the net has {attribution.num_classes} classes"
            )
        top_k = None
    k = top_k or per_image.shape[1]
    inputs_hash = hashlib.sha256(
        ("\n".join(paths) if paths is not None else _sha256(array)).encode()
    ).hexdigest()
    plan = {
        "model_def_sha256": _sha256(model_def),
        "pretrained_model_sha256": _sha256(pretrained_model),
        "inputs": {"count": count, "sha256": inputs_hash, "kind": "files" if paths is not None else "npy"},
        "preprocessing": None if preprocessing is None else preprocessing.describe(),
        "classes": {"top_k": top_k}
        if per_image is None
        else {"sha256": hashlib.sha256(np.ascontiguousarray(per_image).tobytes()).hexdigest(), "k": k},
        "method": method,
        "options": {key: _jsonable(value) for key, value in sorted(attribution.options.items())},
        "exact": bool(options.get("exact", True)),
        "score": attribution._main.score,
        "chunk_size": chunk_size,
    }
    spec = JobSpec(
        output=str(Path(output).resolve()),
        model_def=str(Path(model_def).resolve()),
        pretrained_model=str(Path(pretrained_model).resolve()),
        paths=None if paths is None else [str(Path(p).resolve()) for p in paths],
        array=array,
        count=count,
        preprocessing=preprocessing,
        classes=None if per_image is None else np.ascontiguousarray(per_image),
        top_k=top_k,
        k=k,
        method=method,
        options=options,
        batch_size=batch_size,
        gpu=gpu,
        chunk_size=chunk_size,
        overlays=None if overlays is None else str(Path(overlays).resolve()),
        plan=plan,
    )
    _create_store(spec, attribution.num_classes, overwrite)
    return spec, attribution


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return {"array_sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    return value


def _create_store(spec: JobSpec, num_classes: int, overwrite: bool) -> None:
    import zarr

    out = Path(spec.output)
    if out.exists():
        try:
            existing = zarr.open_group(spec.output, mode="r").attrs.get("fastsal")
        except Exception:  # not a Zarr store at all
            existing = None
        if existing is None and not overwrite:
            raise JobError(f"{spec.output} exists and is not a fastsal store; choose another output")
        if existing is not None and existing.get("plan") != spec.plan and not overwrite:
            changed = sorted(key for key in spec.plan if existing.get("plan", {}).get(key) != spec.plan[key])
            raise JobError(
                f"{spec.output} holds a job with other arguments (differing: {', '.join(changed)}); "
                "rerun with the same arguments to resume it, or give --overwrite"
            )
        if existing is not None and existing.get("plan") == spec.plan:
            return  # resume
        if overwrite:
            import shutil

            shutil.rmtree(out)
    import fastsal

    group = zarr.open_group(spec.output, mode="w")
    group.attrs["fastsal"] = {"plan": spec.plan, "version": fastsal.__version__}  # the plan first
    n, k, (_, h, w) = spec.count, spec.k, spec.preprocessing.input_shape if spec.preprocessing else (0, 0, 0)
    if spec.preprocessing is None:
        h, w = np.load(spec.array, mmap_mode="r").shape[2:]
    chunk = spec.chunk_size
    group.create_array(
        "maps", shape=(n, k, h, w), chunks=(chunk, k, h, w), dtype="float32", fill_value=np.nan
    )
    group.create_array("classes", shape=(n, k), chunks=(chunk, k), dtype="int32", fill_value=-1)
    group.create_array(
        "scores", shape=(n, num_classes), chunks=(chunk, num_classes), dtype="float32", fill_value=np.nan
    )
    group.create_array("status", shape=(n,), chunks=(chunk,), dtype="int8", fill_value=PENDING)
    if spec.paths is not None:
        with warnings.catch_warnings():  # zarr marks its variable-length string type as not yet in the spec
            warnings.simplefilter("ignore")
            paths = group.create_array("paths", shape=(n,), chunks=(max(1, n),), dtype=str)
            paths[:] = np.array(spec.paths, dtype=object)


@dataclass
class JobSummary:
    images: int
    ok: int
    failed: int
    seconds: float
    chunks_done_before: int

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 else 1

    def line(self, output: str) -> str:
        rate = self.ok / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.chunks_done_before} chunks already done" if self.chunks_done_before else ""
        return (
            f"fastsal: {self.images} images, {self.ok} ok, {self.failed} failed{resumed}; "
            f"{self.seconds:.1f} s, {rate:.1f} images/s -> {output}"
        )


def run_job(
    images, model_def, pretrained_model, output, *, workers=None, scheduler=None, quiet=False, **options
):
    """Runs (or resumes) a job: see the module's docstring and ``fastsal run --help``. Returns a
    JobSummary; images that fail are recorded in the store and counted, not raised."""
    spec, attribution = _prepare(images, model_def, pretrained_model, output, **options)
    done = done_chunks(spec.output)
    todo = [c for c in range(spec.chunks) if c not in done]
    start = time.perf_counter()
    from tqdm import tqdm

    with tqdm(
        total=spec.count,
        initial=sum(len(spec.chunk_range(c)) for c in done),
        unit="img",
        disable=True if quiet else None,  # None: off when stderr is not a terminal
        file=sys.stderr,
    ) as progress:
        if workers or scheduler:
            del attribution  # the workers load their own
            _run_dask(spec, todo, workers, scheduler, progress)
        else:
            _run_local(Worker(spec, attribution), todo, progress)
    seconds = time.perf_counter() - start
    finished = done_chunks(spec.output)
    failed = sum(len(s["failed"]) for s in finished.values())
    ok = sum(s["ok"] for s in finished.values())
    return JobSummary(spec.count, ok, failed, seconds, len(done))


def _run_local(worker: Worker, todo: list[int], progress) -> None:
    """Decoding runs ahead of the engine (two chunks) and writing behind it, in threads: the engine
    releases the GIL, so they overlap with it."""
    with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        loads = deque(loader.submit(worker.load, c) for c in todo[:2])
        writes = deque()
        for i, chunk in enumerate(todo):
            loaded = loads.popleft().result()
            if i + 2 < len(todo):
                loads.append(loader.submit(worker.load, todo[i + 2]))
            computed = worker.compute(loaded)
            writes.append((writer.submit(worker.write, chunk, computed), len(worker.spec.chunk_range(chunk))))
            while len(writes) > 1 or (writes and writes[0][0].done()):
                future, size = writes.popleft()
                future.result()  # a write error (disk full, permissions) stops the job here
                progress.update(size)
        for future, size in writes:
            future.result()
            progress.update(size)


def _run_dask(spec: JobSpec, todo: list[int], workers, scheduler, progress) -> None:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise JobError("--workers and --scheduler need Dask: pip install 'fastsal[dask]'") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        client.register_plugin(JobPlugin(spec))
        futures = [
            client.submit(_dask_chunk, chunk, key=f"fastsal-chunk-{chunk}", pure=False) for chunk in todo
        ]
        for future in as_completed(futures):
            summary = future.result()
            progress.update(len(spec.chunk_range(summary["chunk"])))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # the dask extra is optional
    WorkerPlugin = object


class JobPlugin(WorkerPlugin):
    """Loads the net once per Dask worker: every chunk task of the job reuses it."""

    name = "fastsal-job"

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def setup(self, worker):
        worker.fastsal_job = Worker(self.spec)


def _dask_chunk(chunk: int) -> dict:
    from distributed import get_worker

    return get_worker().fastsal_job.process(chunk)


def status(output) -> dict:
    """What a store holds: the plan, chunks done, images ok / failed (with reasons) / pending."""
    import zarr

    try:
        group = zarr.open_group(str(output), mode="r")
        meta = group.attrs.get("fastsal")
    except Exception:
        meta = None
    if meta is None:
        raise JobError(f"{output} is not a fastsal store")
    plan = meta["plan"]
    count, chunk = plan["inputs"]["count"], plan["chunk_size"]
    done = done_chunks(str(output))
    paths = group["paths"][:] if "paths" in group else None
    failed = []
    for summary in done.values():
        for index, reason in summary["failed"].items():
            index = int(index)
            failed.append(
                {"index": index, "path": None if paths is None else str(paths[index]), "reason": reason}
            )
    chunks = -(-count // chunk)
    ok = sum(s["ok"] for s in done.values())
    return {
        "images": count,
        "chunks": chunks,
        "chunks_done": len(done),
        "ok": ok,
        "failed": sorted(failed, key=lambda f: f["index"]),
        "pending": count - ok - len(failed),
        "plan": plan,
        "version": meta.get("version"),
    }
