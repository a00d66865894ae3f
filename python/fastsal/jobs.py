"""Jobs: a dataset on disk in, maps on disk out (a Zarr v3 store), chunk by chunk, resumable, on one
machine or a Dask cluster. ``fastsal run`` and ``fastsal status`` (fastsal.cli) are thin layers over
:func:`run_job` and :func:`status`.

The store: ``maps`` (N, K, H, W) float32, ``classes`` (N, K) int32, ``scores`` (N, num_classes) float32,
``status`` (N,) int8 (0 pending, 1 ok, 2 failed), ``paths`` (N,) str, all chunked along N by the job's
chunk, with xarray's dimension names; its attributes hold the plan (model hashes, preprocessing, inputs,
classes, method and options, the noise seed, chunk size) and fastsal's version. A store is built under a
temporary name and renamed into place whole, so a store that exists always has all its arrays. A chunk
is finished when its marker ``.fastsal/chunk-<i>.json`` exists, written atomically after the chunk's data
(with the failed images' reasons and each file's size, mtime and sha256): a rerun with the same plan
does only the chunks without one, whatever a kill left half-written, and redoes the chunks whose files
changed. The metadata is consolidated, so zarr and xarray read the store without listing ``.fastsal``.

The promises: fastsal deletes or overwrites nothing but a store it created (``overwrite`` replaces only a
store holding nothing else), one job at a time writes a store (a lock in ``.fastsal``), a store never
claims maps it does not hold, and an interrupted job finishes on a plain rerun.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import softmax

from . import _attribution, _export
from ._labels import read_labels
from ._load import _listed
from ._preprocess import ImageError, Preprocessing, decode_image, load_mean
from ._saliency import batch_slices
from ._threads import check_threads, default_threads
from ._visualize import OverlayStyle, input_picture

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
PENDING, OK, FAILED = 0, 1, 2
MARKERS = ".fastsal"


class JobError(ValueError):
    """A job refused before any work: bad model, mean, classes, inputs or output."""


class JobUnfinished(RuntimeError):
    """The job ended with chunks still pending (a cluster lost work): rerun to finish it."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job: ``done`` of ``total`` chunks are finished; a rerun resumes."""

    def __init__(self, done: int, total: int):
        super().__init__(f"interrupted after {done} of {plural(total, 'chunk')}")
        self.done, self.total = done, total


def plural(n: int, noun: str) -> str:
    """'1 image', '2 images': the CLI's lines count in words."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# What a store holds, file by file: fastsal deletes a store on overwrite only when it holds nothing else,
# and then only these files (zarr's chunks and its interrupted writes, fastsal's markers and lock).
ARRAYS = ("maps", "classes", "scores", "probabilities", "status", "paths", "convergence_delta")
_LOCK = "lock"
_OWN_FILE = re.compile(  # fastsal evaluate's metrics/ arrays and metrics-* markers (_evaluate_job) too
    rf"zarr\.json|({'|'.join(ARRAYS)}|metrics/\w+)/(zarr\.json|c(/\d+)+(\.[0-9a-f]+\.partial)?)|metrics/zarr\.json"
    rf"|{re.escape(MARKERS)}/({_LOCK}|chunk-\d+\.json|\.chunk-\d+\.json\.\d+\.\d+"
    rf"|metrics-\w+-\d+\.json|\.metrics-\w+-\d+\.json\.\d+\.\d+)"
)
OVERLAYS_MARKER = ".fastsal-overlays"  # in an overlays folder: the store whose overlays it holds


@dataclass
class JobSpec:
    """Everything a worker needs to do any chunk of the job (picklable, sent once per worker)."""

    output: str
    model_def: str
    pretrained_model: str
    paths: list[str] | None  # image files (resolved), or None with array
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
    style: OverlayStyle | None = None  # how overlays look (labels included)
    probabilities: bool = False  # the score blob feeds the net's Softmax output: store its probabilities
    threads: int | None = None  # per process; None: the process's default (a Dask worker: its nthreads)
    plan: dict = field(default_factory=dict)
    convergence_delta: bool = False  # integrated_gradients: store |delta| / |F(x) - F(baseline)|
    arguments: dict | None = None  # what rebuilds this spec (fastsal evaluate), recorded beside the plan
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # this run's Dask keys and plugin

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


def _unchanged(path: str, recorded) -> bool:
    """Whether a file is the one a finished chunk read: size and mtime first, the content when they moved."""
    try:
        stat = os.stat(path)
    except OSError:
        return recorded is None
    if recorded is None:
        return False
    if [stat.st_size, stat.st_mtime_ns] == recorded[:2]:
        return True
    try:
        return stat.st_size == recorded[0] and _sha256(path) == recorded[2]
    except OSError:
        return False


_GLOB = set("*?[")


def list_inputs(images, exclude=()) -> tuple[list[str] | None, str | None]:
    """(paths, None) for a directory (recursive, image suffixes), a glob or a text file of paths; or
    (None, path) for a .npy array of preprocessed inputs. Paths are made absolute (symbolic links kept):
    a job is the same job only on the same files, wherever it is started from. Folders in ``exclude``
    (the job's own store and overlays) are never inputs."""
    text = str(images)
    path = Path(text)
    skip = [os.path.abspath(e) + os.sep for e in exclude if e is not None]

    def mine(p: str) -> bool:
        return any((os.path.abspath(p) + os.sep).startswith(s) for s in skip)

    if path.is_dir():
        found = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths = sorted(str(p) for p in found if not mine(str(p)))
        where = f"directory {text!r} (recursively, files ending in {', '.join(sorted(IMAGE_SUFFIXES))})"
    elif path.is_file() and path.suffix.lower() == ".npy":
        return None, os.path.abspath(text)
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        paths, where = [text], text
    elif path.is_file():
        try:
            lines = [line.strip() for line in path.read_text().splitlines()]
        except UnicodeDecodeError:
            raise JobError(
                f"{text} is no folder, image, .npy or text file of paths (it is not UTF-8 text)"
            ) from None
        paths = [str(path.parent / line) if not os.path.isabs(line) else line for line in lines if line]
        where = f"list {text!r}"
    elif not _GLOB.intersection(text):
        raise JobError(f"no such file or directory: {text}")
    else:
        paths = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p) and not mine(p))
        where = f"glob {text!r}"
    if not paths:
        raise JobError(f"no images found in {where}")
    for p in paths:  # the store records paths as UTF-8 text
        try:
            p.encode()
        except UnicodeEncodeError:
            raise JobError(
                f"the file name {os.fsencode(p)!r} is not UTF-8, which the store's paths must be: rename it"
            ) from None
    return [os.path.abspath(p) for p in paths], None


INT32_MAX = np.iinfo(np.int32).max


def _classes_from_file(path, count: int) -> np.ndarray:
    rows = []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise JobError(f"cannot read the classes file {path}: {error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = [int(v) for v in line.replace(",", " ").split()]
        except ValueError:
            raise JobError(f"{path}:{number}: expected class ids (integers), got {line!r}") from None
        if not row or any(abs(v) > INT32_MAX for v in row):
            raise JobError(f"{path}:{number}: expected class ids (integers), got {line!r}")
        rows.append(row)
    if len(rows) != count or len({len(r) for r in rows}) != 1:
        raise JobError(f"{path} must hold one row of K class ids per image: {count} images, {len(rows)} rows")
    return np.array(rows, np.int32)


def _open_store(output: str, mode: str):
    import zarr

    return zarr.open_group(output, mode=mode)


class ModelError(JobError):
    """Every image of a chunk failed inside the net the same way: the model, not the images, is broken."""


class Worker:
    """The model loaded once per process; decodes, explains and writes any chunk of the job."""

    def __init__(
        self, spec: JobSpec, attribution: _attribution.Attribution | None = None, threads: int | None = None
    ):
        import fastsal

        self.spec = spec
        if attribution is None:  # a Dask worker: the client checked the model (and warned) already
            fastsal.set_caffe_log_level(2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fastsal.MissingWeightsWarning)
                net = fastsal.load(spec.model_def, spec.pretrained_model, validate=False)
            attribution = _attribution.Attribution(
                net,
                spec.method,
                batch_size=spec.batch_size,
                device=spec.gpu,
                threads=spec.threads or threads,
                **spec.options,
            )
        self.attribution = attribution
        self.decoders = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
        self._array = None
        self._store = None
        self.deltas = {}  # integrated_gradients: index -> (K,) relative convergence delta, until written

    def load(self, chunk: int):
        """(inputs (n_ok, C, H, W), indices of those, {index: reason}, {index: file identity})."""
        indices = list(self.spec.chunk_range(chunk))
        if self.spec.array is not None:
            if self._array is None:
                self._array = np.load(self.spec.array, mmap_mode="r")
            batch = np.asarray(self._array[indices[0] : indices[-1] + 1], np.float32)
            finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
            failed = {i: "contains NaN or Inf" for i, ok in zip(indices, finite) if not ok}
            good = [i for i in indices if i not in failed]
            return batch[finite], good, failed, {}
        preprocessing = self.spec.preprocessing

        def decode(index):
            path, identity = (
                self.spec.paths[index],
                None,
            )  # identity: [size, mtime_ns, sha256], what a resume compares
            try:
                stat = os.stat(path)  # before reading: a file changed after this is redone
                with open(path, "rb") as f:
                    data = f.read()
                identity = [stat.st_size, stat.st_mtime_ns, hashlib.sha256(data).hexdigest()]
                image = decode_image(data, color=preprocessing.input_shape[0] == 3)
                return preprocessing(image), None, identity
            except ImageError as error:
                return None, str(error), identity
            except OSError as error:
                return None, f"cannot read: {error.strerror or error}", identity

        results = list(self.decoders.map(decode, indices))
        failed = {i: r[1] for i, r in zip(indices, results) if r[1] is not None}
        good = [i for i, r in zip(indices, results) if r[1] is None]
        inputs = [r[0] for r in results if r[1] is None]
        files = {i: r[2] for i, r in zip(indices, results)}
        shape = self.attribution.image_shape
        batch = np.stack(inputs) if inputs else np.empty((0, *shape), np.float32)
        return batch, good, failed, files

    def compute(self, loaded, on_batch=None):
        """Maps, classes and scores of the chunk's good images, a batch (``batch_size`` images) at a
        time, each batch's results handed to ``on_batch(results, files)`` as it finishes (progress,
        overlays). An image the engine refuses (its activations overflow) is moved to the failed ones
        with the engine's reason. When every image of the chunk fails so, the model is blamed
        (ModelError) and the chunk stays unfinished."""
        batch, good, failed, files = loaded
        results, reasons = {}, {}
        for part in batch_slices(len(good), self.attribution._main.batch_size) if len(good) else []:
            indices, done = good[part], {}
            try:
                done = dict(zip(indices, zip(*self._explain(batch[part], indices, self.spec.classes))))
            except ValueError:  # one image's overflow: find it, keep the rest
                for row, index in zip(range(part.start, part.stop), indices):
                    try:
                        maps, ids, scores = self._explain(batch[row : row + 1], [index], self.spec.classes)
                        done[index] = (maps[0], ids[0], scores[0])
                    except ValueError as error:
                        reasons[index] = str(error).replace("images[0]", f"image {index}")
            results.update(done)
            if on_batch is not None:
                on_batch(done, files)
        if len(good) > 1 and not results and reasons:
            raise ModelError(
                f"every one of the {len(good)} images of inputs {good[0]}-{good[-1]} failed inside the net "
                f"({next(iter(reasons.values()))}): the model or the preprocessing is broken, not the "
                "images; check the weights and the mean and scale flags"
            )
        failed.update(reasons)
        keep = [i for i in good if i in results]
        return results, keep, failed, files

    def _explain(self, batch, indices, classes):
        rows = None if classes is None else classes[indices]
        # Each image's index in the whole input list keys its noise: maps do not depend on the chunking.
        if not self.spec.convergence_delta:
            return self.attribution.explain(batch, rows, self.spec.top_k, image_ids=indices)
        from .metrics import _relative_delta  # fastsal.evaluate's definition of the relative delta

        maps, ids, scores, delta = self.attribution.explain(
            batch, rows, self.spec.top_k, image_ids=indices, return_convergence_delta=True
        )
        relative = _relative_delta(self.attribution, self.attribution, batch, ids, delta)
        self.deltas.update(zip(indices, relative.astype(np.float32)))
        return maps, ids, scores

    def write(self, chunk: int, computed) -> dict:
        results, keep, failed, files = computed
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
        if self.spec.probabilities:  # the net's own Softmax, on the scores it was fed
            store["probabilities"][block] = softmax(scores.astype(np.float64), axis=1).astype(np.float32)
        if self.spec.convergence_delta:
            delta = np.full((n, k), np.nan, np.float32)
            for index in keep:
                delta[index - span.start] = self.deltas.pop(index)
            store["convergence_delta"][block] = delta
        store["status"][block] = state
        summary = {
            "chunk": chunk,
            "ok": len(keep),
            "failed": {str(i): r for i, r in sorted(failed.items())},
            "files": {str(i): identity for i, identity in sorted(files.items())},
        }
        _write_marker(self.spec.output, chunk, summary)  # last: the chunk is finished only now
        return summary

    def write_overlays(self, results: dict, files: dict) -> None:
        """One overlay per class of each image in results (a batch), on its photo, read again from its
        file (a chunk of big photos is not held in memory for this); a file changed meanwhile gets none."""
        if not self.spec.overlays:
            return
        folder = claim_folder(Path(self.spec.overlays), Path(self.spec.output))
        for index, (maps, ids, scores) in results.items():
            if self.spec.paths is None:
                photo, stem = input_picture(self._array[index]), "input"
            else:
                path = self.spec.paths[index]
                try:
                    if not _unchanged(path, files.get(index)):
                        continue
                    with open(path, "rb") as f:
                        photo = _export.photo_of(f.read())
                except (OSError, ImageError):
                    continue
                stem = Path(path).stem
            probabilities = softmax(scores.astype(np.float64)) if self.spec.probabilities else None
            _export.save_image_overlays(
                folder, index, stem, photo, maps, ids, scores, probabilities, self.spec.plan, self.spec.style
            )

    def process(self, chunk: int) -> dict:
        return self.write(chunk, self.compute(self.load(chunk), self.write_overlays))


def overlay_name(index: int, stem: str, class_id: int, limit: int = 255) -> str:
    """``<index>_<stem>_class<id>.png``, the stem shortened (on a character boundary) to fit a file name."""
    prefix, suffix = f"{index:06d}_", f"_class{class_id}.png"
    room = limit - len(prefix.encode()) - len(suffix.encode())
    stem = stem.encode()[:room].decode(errors="ignore")
    return prefix + stem + suffix


def _write_marker(output: str, chunk: int, summary: dict) -> None:
    folder = Path(output) / MARKERS
    folder.mkdir(exist_ok=True)
    temporary = folder / f".chunk-{chunk:06d}.json.{os.getpid()}.{threading.get_ident()}"
    with open(temporary, "w") as f:
        json.dump(summary, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, folder / f"chunk-{chunk:06d}.json")


def done_chunks(output: str, chunks: int | None = None) -> dict[int, dict]:
    """The finished chunks' markers. One that does not read as fastsal wrote it (damage from outside), or
    names no chunk of the job, does not count: its chunk is done again."""
    folder = Path(output) / MARKERS
    if not folder.is_dir():
        return {}
    done = {}
    for path in folder.glob("chunk-*.json"):
        match = re.fullmatch(r"chunk-(\d+)\.json", path.name)
        try:
            summary = json.loads(path.read_text())
            valid = isinstance(summary.get("ok"), int) and isinstance(summary.get("failed"), dict)
        except (OSError, ValueError, AttributeError):
            valid = False
        chunk = int(match.group(1)) if match else -1
        if valid and 0 <= chunk and (chunks is None or chunk < chunks):
            done[chunk] = summary
    return done


def prepare(images, model_def, pretrained_model, output, **options) -> JobSpec:
    """Checks everything and writes the plan (see :func:`_prepare`); returns the job's spec."""
    spec, _, lock = _prepare(images, model_def, pretrained_model, output, **options)
    lock.close()
    return spec


def _check_array(array: str, image_shape) -> int:
    """The number of inputs in a .npy, refused unless it holds real numbers of the net's input shape."""
    try:
        values = np.load(array, mmap_mode="r")
    except ValueError as error:
        if "object" in str(error).lower():  # object arrays need pickle, which fastsal never loads
            raise JobError(
                f"{array} must hold real numbers (integers or floats), got Python objects"
            ) from None
        raise JobError(f"{array} is no readable .npy array: {error}") from None
    except (EOFError, OSError) as error:
        raise JobError(f"{array} is no readable .npy array: {error or type(error).__name__}") from None
    kind = values.dtype
    if kind == np.bool_ or not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise JobError(f"{array} must hold real numbers (integers or floats), got dtype {kind}")
    c, h, w = image_shape
    if values.ndim != 4 or values.shape[1:] != (c, h, w):
        raise JobError(
            f"{array} holds shape {values.shape}; the net takes preprocessed (N, {c}, {h}, {w}) inputs"
        )
    return values.shape[0]


def _check_model(attribution, preprocessing) -> None:
    """One forward of a plain grey picture: weights that give no finite scores are refused, not blamed on
    every image later."""
    c, h, w = attribution.image_shape
    grey = np.zeros((c, h, w), np.float32)
    if preprocessing is not None:
        grey = preprocessing.transform(np.full((h, w, c), 0.5, np.float32))
    try:
        finite = np.isfinite(attribution.scores(grey[np.newaxis])).all()
    except ValueError:  # the engine's overflow check
        finite = False
    if not finite:
        raise JobError(
            "the model gives no finite scores on a plain grey picture: its weights are broken (NaN, Inf "
            "or huge) or do not belong to this prototxt"
        )


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
    channel_swap="default",
    input_scale=None,
    batch_size=None,
    gpu=None,
    chunk_size=64,
    overlays=None,
    overwrite=False,
    threads=None,
    labels=None,
    style=None,
):
    """Checks everything and writes the plan: the store exists, whole, empty or partly done, and is
    locked for this job when it returns. Raises JobError (or FileNotFoundError) before any work for a bad
    model, mean, classes, inputs or output. ``labels``: a class-names file for the overlays' captions;
    ``style``: an OverlayStyle for the overlays. Returns the spec, the checked model's Attribution, which
    the local run reuses, and the store's lock (held until closed)."""
    import fastsal

    options = dict(method_options or {})
    if options.get("reduce") == "none":
        raise JobError("jobs write maps: reduce must be 'absmax' or 'sum'")
    if sum(x is not None for x in (classes, top_k, classes_file)) > 1:
        raise JobError("give one of classes, top_k or classes_file")
    if chunk_size < 1:
        raise JobError(f"chunk_size must be positive, got {chunk_size}")
    if threads is not None:
        try:
            check_threads(threads)
        except ValueError as error:
            raise JobError(str(error)) from None
    for path in (model_def, pretrained_model):
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file not found: {path}")
    # Before the slow checks: an output or overlays folder fastsal may not write is refused at once.
    out = Path(output).resolve()
    _check_output(out, overwrite)
    if overlays is not None:
        _check_overlays(Path(overlays).resolve(), out)
    paths, array = list_inputs(images, exclude=(output, overlays))
    net = fastsal.load(model_def, pretrained_model)  # a broken model raises here, in a child process
    try:
        attribution = _attribution.Attribution(
            net, method, batch_size=batch_size, device=gpu, threads=threads, **options
        )
    except TypeError as error:
        raise JobError(str(error)) from None
    c, h, w = attribution.image_shape
    if array is not None:
        count, preprocessing = _check_array(array, (c, h, w)), None
    else:
        count = len(paths)
        if mean_file is not None and mean_value is not None:
            raise JobError("give mean_file or mean_value, not both")
        mean = load_mean(mean_file) if mean_file is not None else mean_value
        if isinstance(channel_swap, str) and channel_swap == "default":  # classify.py's, for RGB nets only
            channel_swap = (2, 1, 0) if c == 3 else None
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
        if (np.abs(ids) > INT32_MAX).any():
            raise JobError(f"class {int(ids[np.abs(ids) > INT32_MAX][0])} is out of range")
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
    _check_model(attribution, preprocessing)
    if preprocessing is not None and mean is None:
        _check_mean(net, attribution, preprocessing)
    style = style or OverlayStyle()
    if labels is not None:
        try:
            names = read_labels(labels, attribution.num_classes)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise JobError(f"cannot use the labels file {labels}: {error}") from None
        style = dataclasses.replace(style, labels=tuple(names))
    k = top_k or per_image.shape[1]
    inputs_hash = hashlib.sha256(
        ("\n".join(paths) if paths is not None else _sha256(array)).encode()
    ).hexdigest()
    if "seed" in attribution.options and attribution.options["seed"] is None:
        # One draw per store, recorded in the plan: a resume adds no second noise draw.
        existing = None if overwrite else _read_meta(out)
        seed = (existing or {}).get("plan", {}).get("options", {}).get("seed")
        seed = seed if isinstance(seed, int) else secrets.randbits(31)
        options["seed"] = attribution.options["seed"] = seed
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
    probabilities = _feeds_softmax(net, attribution._main.score)
    if probabilities:  # only then: a plan without the key is an older store's, which resumes as it was
        plan["probabilities"] = True
    if method == "integrated_gradients":  # likewise: the relative convergence delta per (image, class)
        plan["convergence_delta"] = True
    spec = JobSpec(
        output=str(out),
        model_def=str(Path(model_def).resolve()),
        pretrained_model=str(Path(pretrained_model).resolve()),
        paths=paths,
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
        style=style,
        probabilities=probabilities,
        threads=threads,
        plan=plan,
        convergence_delta=method == "integrated_gradients",
        arguments=_arguments(
            images,
            model_def,
            pretrained_model,
            overlays,
            classes=classes,
            top_k=top_k,
            classes_file=classes_file,
            method=method,
            method_options=method_options,
            images_dim=images_dim,
            mean_file=mean_file,
            mean_value=mean_value,
            raw_scale=raw_scale,
            channel_swap=channel_swap,
            input_scale=input_scale,
            chunk_size=chunk_size,
        ),
    )
    lock = _claim_store(spec, attribution.num_classes, overwrite)
    return spec, attribution, lock


def _arguments(images, model_def, pretrained_model, overlays, **options) -> dict | None:
    """The run's arguments as JSON, paths made absolute: fastsal evaluate rebuilds the spec from them
    (through _prepare, so the plan is checked again). None when an option is no JSON (an array)."""
    absolute = {
        key: None if options[key] is None else os.path.abspath(options[key])
        for key in ("classes_file", "mean_file")
    }
    if options["classes"] is not None:
        absolute["classes"] = np.atleast_1d(np.asarray(options["classes"])).tolist()
    found = {
        "images": os.path.abspath(str(images)),
        "model_def": os.path.abspath(model_def),
        "pretrained_model": os.path.abspath(pretrained_model),
        "overlays": None if overlays is None else os.path.abspath(overlays),
        "options": options | absolute,
    }
    try:
        return json.loads(json.dumps(found, default=lambda v: np.asarray(v).tolist()))
    except (TypeError, ValueError):  # an option NumPy does not take either
        return None


def _feeds_softmax(net, score: str) -> bool:
    """Whether the score blob feeds a Softmax layer whose output is the net's (as the engine's default
    score blob is found): the store then holds probabilities, that Softmax applied to the scores."""
    for name, layer in zip(net._layer_names, net.layers):
        tops = list(net.top_names[name])
        if (
            layer.type == "Softmax"
            and list(net.bottom_names[name]) == [score]
            and set(tops) & set(net.outputs)
        ):
            return True
    return False


# A typical ImageNet mean (BGR) for the check below: what Caffe's ImageNet models subtract.
_IMAGENET_MEAN = (104.0, 117.0, 123.0)


def _check_mean(net, attribution, preprocessing) -> None:
    """Warns once when a run without a mean looks like a forgotten one, comparing a mid-grey picture
    without a mean and with a typical ImageNet mean subtracted. A net with BatchNorm recorded its
    training inputs' statistics: when the grey picture's activations at the first BatchNorm are more
    than 3x further (in its recorded standard deviations) from its recorded means without the mean than
    with it, the net was trained on mean-subtracted inputs. Without BatchNorm: a trained classifier
    should not be sure of a featureless picture, so a net that is (top probability > 0.99) only
    without the mean was almost surely trained with it."""
    c, h, w = attribution.image_shape
    grey = np.full((h, w, c), 0.5, np.float32)
    mean = np.asarray(_IMAGENET_MEAN if c == 3 else (np.mean(_IMAGENET_MEAN),), np.float32)
    inputs = np.stack(
        [preprocessing.transform(grey), dataclasses.replace(preprocessing, mean=mean).transform(grey)]
    )
    try:
        distances = _batchnorm_distances(net, inputs)
        if distances is not None:
            layer, (without, with_mean) = distances
            forgotten = without > 3 * with_mean
            why = (
                f"a grey picture's activations at its BatchNorm '{layer}' are {without / max(with_mean, 1e-12):.0f}x "
                "further from the statistics it recorded in training than with the ImageNet mean subtracted"
            )
        else:
            top = softmax(attribution.scores(inputs).astype(np.float64), axis=1).max(axis=1)
            forgotten = top[0] > 0.99 and top[1] <= 0.99
            why = (
                f"the net is {top[0]:.1%} sure of a plain grey picture unless the ImageNet mean is subtracted"
            )
    except ValueError:  # the engine's overflow check: _check_model has judged the weights already
        return
    if forgotten:
        warnings.warn(
            f"no mean given, but {why} ({', '.join(f'{v:g}' for v in _IMAGENET_MEAN)}): it was probably "
            "trained on mean-subtracted inputs; give --mean-file or --mean-value (classify.py's --mean_file)",
            stacklevel=3,
        )


def _batchnorm_distances(net, inputs: np.ndarray):
    """(the first BatchNorm layer, each input's median over channels of |spatial mean of its bottom -
    recorded mean| / recorded std), or None when the net has no BatchNorm with recorded statistics."""
    names = list(net._layer_names)
    found = [i for i, layer in enumerate(net.layers) if layer.type == "BatchNorm" and len(layer.blobs) == 3]
    if not found:
        return None
    index = found[0]
    blobs = net.layers[index].blobs
    factor = float(blobs[2].data.ravel()[0])
    if factor == 0:
        return None
    means, variances = blobs[0].data / factor, blobs[1].data / factor
    bottom = net.bottom_names[names[index]][0]
    producers = [i for i in range(index) if bottom in net.top_names[names[i]]]
    if not producers:
        return None
    data = net.blobs[net.inputs[0]]
    shape = data.data.shape
    try:
        data.reshape(*inputs.shape)
        data.data[...] = inputs
        net.forward(end=names[producers[-1]])
        values = net.blobs[bottom].data.reshape(len(inputs), len(means), -1).mean(axis=2)
    finally:
        data.reshape(*shape)
    distance = np.abs(values - means) / np.sqrt(variances + 1e-5)
    return names[index], tuple(float(d) for d in np.median(distance, axis=1))


def _jsonable(value):
    """An option as the plan records it, and as it reads back from JSON: tuples become lists (else
    a tuple-valued option such as occlusion's window would never equal its stored self)."""
    if isinstance(value, np.ndarray):
        return {"array_sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- the store on disk: recognised, locked, created whole, replaced only when it is fastsal's alone ----


def _read_meta(out: Path) -> dict | None:
    """The fastsal attributes of a store at out, or None when out is no fastsal store."""
    try:
        meta = json.loads((out / "zarr.json").read_text())
        found = meta.get("attributes", {}).get("fastsal")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) and "plan" in found else None


def _foreign_files(folder: Path) -> list[str]:
    """What a folder holds that fastsal's stores never do (links count as foreign), relative names."""
    foreign = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if os.path.islink(os.path.join(root, name)) or not _OWN_FILE.fullmatch(relative):
                foreign.append(relative)
    return sorted(foreign)


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuses an output fastsal may not write: a file, a folder that is not a fastsal store, a place
    under a file; with ``overwrite``, a store holding anything fastsal did not write."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise JobError(f"cannot create {out}: {parent} is a file, not a folder")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise JobError(f"{out} is a file, not a store; choose another output")
    ours = _read_meta(out) is not None
    entries = sorted(p.name for p in out.iterdir())
    if not ours and entries:
        raise JobError(
            f"{out} exists and is not a fastsal store (it holds {_listed(entries, 3)}); fastsal writes only "
            "into stores it created and deletes nothing else, --overwrite included: choose another output"
        )
    if overwrite and ours:
        foreign = _foreign_files(out)
        if foreign:
            them = "it" if len(foreign) == 1 else "them"
            raise JobError(
                f"{out} is a fastsal store that also holds {_listed(foreign, 5)}, which fastsal did not "
                f"write; --overwrite would delete {them}: move {them} out first"
            )


def _check_overlays(folder: Path, out: Path) -> None:
    """An overlays (or export) folder is new, empty, or one fastsal wrote for this store before: fastsal
    never overwrites pictures it did not make."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if not folder.is_dir():
        raise JobError(f"the folder {folder} is a file; choose another")
    if not any(folder.iterdir()):
        return
    try:
        owner = (folder / OVERLAYS_MARKER).read_text().strip()
    except OSError:
        owner = None
    if owner != str(out):
        raise JobError(
            f"the folder {folder} holds files that fastsal did not write for this store; fastsal "
            "overwrites nothing it did not make: choose a new or empty folder"
        )


def claim_folder(folder: Path, out: Path) -> Path:
    """Creates an output folder checked by _check_overlays and marks it as this store's (first: the
    folder is fastsal's from now on)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OVERLAYS_MARKER
    if not marker.exists():
        marker.write_text(str(out))
    return folder


def _lock(out: Path):
    """An exclusive lock on the store for this job (released when the file closes, or the process dies)."""
    folder = out / MARKERS
    folder.mkdir(exist_ok=True)
    handle = open(folder / _LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise JobError(
            f"another fastsal job (pid {holder}) is writing {out}; wait for it to finish, or stop it"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _temporary(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.fastsal-{kind}-{os.getpid()}"


def _remove_own_store(folder: Path) -> None:
    """Deletes the files of a store fastsal made, then the folders left empty: never anything else."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and _OWN_FILE.fullmatch(os.path.relpath(path, folder)):
                os.unlink(path)
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except OSError:
                pass  # something fastsal did not write: left where it is
    try:
        folder.rmdir()
    except OSError:
        pass


def _remove_stale_temporaries(out: Path) -> None:
    """Stores half-built or half-replaced by a job that was killed (its process is gone)."""
    for candidate in out.parent.glob(f".{glob.escape(out.name)}.fastsal-*-*"):
        try:
            os.kill(int(candidate.name.rsplit("-", 1)[1]), 0)
            continue  # that job is still running
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        if candidate.is_dir() and not candidate.is_symlink() and not _foreign_files(candidate):
            _remove_own_store(candidate)


def _claim_store(spec: JobSpec, num_classes: int, overwrite: bool):
    """Resumes the store at spec.output (same plan), or creates it (replacing it with ``overwrite``);
    returns the job's lock on it."""
    out = Path(spec.output)
    _remove_stale_temporaries(out)
    _check_output(out, overwrite)
    existing = _read_meta(out)
    if existing is None:
        return _create_store(spec, num_classes, out)
    lock = _lock(out)
    try:
        if overwrite:
            new_lock = _replace_store(spec, num_classes, out)
            lock.close()
            return new_lock
        if "probabilities" not in existing["plan"] and spec.probabilities:
            # a store from before probabilities were stored resumes as it was made: scores only
            spec.probabilities = False
            del spec.plan["probabilities"]
        if "convergence_delta" not in existing["plan"] and spec.convergence_delta:  # nor the IG delta
            spec.convergence_delta = False
            del spec.plan["convergence_delta"]
        if existing["plan"] != spec.plan:
            changed = sorted(key for key in spec.plan if existing["plan"].get(key) != spec.plan[key])
            raise JobError(
                f"{spec.output} holds a job with other arguments (differing: {', '.join(changed)}); "
                "rerun with the same arguments to resume it, or give --overwrite to recompute it"
            )
        _check_arrays(spec, num_classes, out)
        if existing.get("arguments") is None and spec.arguments is not None:  # fastsal evaluate needs them
            _record_arguments(out, existing, spec.arguments)
    except BaseException:
        lock.close()
        raise
    return lock


def _record_arguments(out: Path, meta: dict, arguments: dict) -> None:
    import zarr

    zarr.open_group(str(out), mode="r+", use_consolidated=False).attrs["fastsal"] = {
        **meta,
        "arguments": arguments,
    }
    with warnings.catch_warnings():  # zarr: consolidated metadata is not in the v3 spec yet
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(out))


def _expected_shapes(spec: JobSpec, num_classes: int) -> dict[str, tuple]:
    n, k = spec.count, spec.k
    h, w = (
        spec.preprocessing.input_shape[1:]
        if spec.preprocessing
        else np.load(spec.array, mmap_mode="r").shape[2:]
    )
    shapes = {"maps": (n, k, h, w), "classes": (n, k), "scores": (n, num_classes), "status": (n,)}
    if spec.probabilities:
        shapes["probabilities"] = (n, num_classes)
    if spec.convergence_delta:
        shapes["convergence_delta"] = (n, k)
    if spec.paths is not None:
        shapes["paths"] = (n,)
    return shapes


def _check_arrays(spec: JobSpec, num_classes: int, out: Path) -> None:
    """A resumed store must hold every array, at the plan's shape (damage from outside is refused). Each
    array's own metadata is read: the consolidated copy in the group would hide a deleted array."""
    for name, shape in _expected_shapes(spec, num_classes).items():
        try:
            found = tuple(json.loads((out / name / "zarr.json").read_text())["shape"])
        except (OSError, ValueError, KeyError, TypeError):
            found = None
        if found != shape:
            what = "is missing" if found is None else f"has shape {found}, not {shape}"
            raise JobError(
                f"{out} is damaged: its array '{name}' {what}; rerun with --overwrite to recompute the store"
            )


def _create_store(spec: JobSpec, num_classes: int, out: Path):
    """Builds the whole store under a temporary name, locks it and renames it into place."""
    temporary = _temporary(out, "new")
    try:
        _build_store(spec, num_classes, temporary, out)
        lock = _lock(temporary)
        try:
            os.rename(temporary, out)  # atomic; onto an empty folder too
        except OSError as error:
            lock.close()
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise JobError(f"{out} was created by someone else meanwhile; rerun to resume it") from None
            raise
    except BaseException:
        if temporary.exists():
            _remove_own_store(temporary)
        raise
    return lock


def _replace_store(spec: JobSpec, num_classes: int, out: Path):
    """--overwrite: the old store (fastsal's alone, checked) set aside, the new one renamed into place,
    then the old one deleted. A kill between leaves only fastsal's temporaries, removed by the next run."""
    new_lock = None
    temporary = _temporary(out, "new")
    try:
        _build_store(spec, num_classes, temporary, out)
        new_lock = _lock(temporary)
        old = _temporary(out, "old")
        os.rename(out, old)
        os.rename(temporary, out)
    except BaseException:
        if new_lock is not None:
            new_lock.close()
        if temporary.exists():
            _remove_own_store(temporary)
        raise
    _remove_own_store(old)
    return new_lock


def _build_store(spec: JobSpec, num_classes: int, folder: Path, out: Path) -> None:
    import zarr

    import fastsal

    try:
        group = zarr.open_group(str(folder), mode="w-")
    except OSError as error:  # the user named out, not fastsal's temporary beside it
        raise OSError(error.errno, f"cannot create the store {out}: {error.strerror or error}") from None
    shapes = _expected_shapes(spec, num_classes)
    chunk = spec.chunk_size
    coordinates = {"coordinates": "paths"} if spec.paths is not None else {}  # xarray's per-image labels
    for name, dims, dtype, fill in (
        ("maps", ("image", "class", "y", "x"), "float32", np.nan),
        ("classes", ("image", "class"), "int32", -1),
        ("scores", ("image", "label"), "float32", np.nan),
        ("probabilities", ("image", "label"), "float32", np.nan),
        ("status", ("image",), "int8", PENDING),
        ("convergence_delta", ("image", "class"), "float32", np.nan),
    ):
        if name not in shapes:
            continue
        shape = shapes[name]
        array = group.create_array(
            name, shape=shape, chunks=(chunk, *shape[1:]), dtype=dtype, fill_value=fill, dimension_names=dims
        )
        array.attrs.update(coordinates)
    if spec.paths is not None:
        with warnings.catch_warnings():  # zarr marks its variable-length string type as not yet in the spec
            warnings.simplefilter("ignore")
            n = spec.count
            paths = group.create_array(
                "paths", shape=(n,), chunks=(max(1, n),), dtype=str, dimension_names=("image",)
            )
            paths[:] = np.array(spec.paths, dtype=object)
    # The .npy's path beside the plan (not in it: the plan names inputs by content), for export's overlays.
    group.attrs["fastsal"] = {
        "plan": spec.plan,
        "version": fastsal.__version__,
        "array": spec.array,
        "arguments": spec.arguments,
    }
    with warnings.catch_warnings():  # zarr: consolidated metadata is not in the v3 spec yet
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(folder))  # readers need not list the folder (.fastsal is no array)


@dataclass
class JobSummary:
    images: int
    ok: int
    failed: int
    seconds: float
    chunks_done_before: int
    computed: int = 0  # images this run decoded and explained
    chunks: int = 0
    redone: int = 0  # finished chunks redone because their files changed
    spread: str = ""  # who did the work: "2 threads", "2 workers x 1 thread"

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 else 1

    def line(self, output: str) -> str:
        counts = f"fastsal: {plural(self.images, 'image')}, {self.ok} ok, {self.failed} failed"
        if not self.computed:
            return f"{counts}; all {plural(self.chunks, 'chunk')} already done -> {output}"
        resumed = (
            f", {plural(self.chunks_done_before, 'chunk')} already done" if self.chunks_done_before else ""
        )
        redone = f", {plural(self.redone, 'chunk')} redone (files changed)" if self.redone else ""
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        # A slow method (occlusion, RISE) reads better as seconds per image than as "0.0 images/s".
        speed = f"{rate:.1f} images/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/image"
        spread = f" on {self.spread}" if self.spread else ""
        return (
            f"{counts}{resumed}{redone}; {plural(self.computed, 'image')} in {self.seconds:.1f} s{spread}, "
            f"{speed} -> {output}"
        )


def _changed_chunks(spec: JobSpec, done: dict[int, dict]) -> list[int]:
    """Finished chunks whose files are no longer the ones they read."""
    if spec.paths is None:
        return []
    return sorted(
        chunk
        for chunk, summary in done.items()
        if any(
            not _unchanged(spec.paths[int(i)], identity) for i, identity in summary.get("files", {}).items()
        )
    )


def _check_job_options(options: dict) -> None:
    """run_job's own message for a keyword it does not take (not _prepare's), pointing a method's option
    (samples=, n_steps=, ...) to method_options, where the CLI's --samples goes."""
    import inspect

    known = [n for n, p in inspect.signature(_prepare).parameters.items() if p.kind == p.KEYWORD_ONLY]
    method_options = {name for defaults in _attribution._OPTIONS.values() for name in defaults} | {"exact"}
    for name in options:
        if name not in known:
            where = (
                f"; {name!r} is an option of the method: method_options={{{name!r}: {options[name]!r}}}"
                if name in method_options
                else ""
            )
            raise TypeError(
                f"run_job() got an unknown option {name!r}; it takes {', '.join(known)}, and workers, "
                f"scheduler, quiet{where}"
            )


def run_job(
    images, model_def, pretrained_model, output, *, workers=None, scheduler=None, quiet=False, **options
):
    """Runs (or resumes) a job: see the module's docstring and ``fastsal run --help``. Returns a
    JobSummary; images that fail are recorded in the store and counted, not raised. Raises JobError
    before any work, JobUnfinished when chunks are left pending, JobInterrupted on Ctrl-C."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise JobError(f"workers must be a positive integer, got {workers!r}")
    _check_job_options(options)
    threads = options.get("threads")
    spec, attribution, lock = _prepare(images, model_def, pretrained_model, output, **options)
    if workers and threads is None:  # the threads split between the workers, not each taking them all
        spec.threads = max(1, default_threads() // workers)
    if scheduler:
        spread = "the cluster's workers" + (f" x {plural(spec.threads, 'thread')}" if spec.threads else "")
    elif workers:
        spread = f"{plural(workers, 'worker')} x {plural(spec.threads, 'thread')}"
    else:
        spread = plural(attribution.threads, "thread")
    with lock:
        done = done_chunks(spec.output, spec.chunks)
        redone = _changed_chunks(spec, done)
        for chunk in redone:  # its marker goes first: the chunk is unfinished until redone
            (Path(spec.output) / MARKERS / f"chunk-{chunk:06d}.json").unlink()
            del done[chunk]
        if redone and not quiet:
            print(
                f"fastsal: files changed since {plural(len(redone), 'chunk')} finished: redoing them",
                file=sys.stderr,
            )
        todo = [c for c in range(spec.chunks) if c not in done]
        start = time.perf_counter()
        from tqdm import tqdm

        try:
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
        except KeyboardInterrupt:
            raise JobInterrupted(len(done_chunks(spec.output, spec.chunks)), spec.chunks) from None
        seconds = time.perf_counter() - start
        if spec.overlays and done:  # the chunks finished before this run have overlays too
            _export.write_store_overlays(spec.output, spec.overlays, spec.style, chunks=sorted(done))
        finished = done_chunks(spec.output, spec.chunks)
    missing = spec.chunks - len(finished)
    if missing:
        raise JobUnfinished(
            f"{plural(missing, 'chunk')} of {spec.chunks} still pending after the run (a worker lost them?); "
            "rerun the same command to finish"
        )
    if spec.convergence_delta:  # warned here (and by fastsal status), with the n_steps measured to be enough
        from ._evaluate_job import check_convergence

        warning = check_convergence(spec)
        if warning:
            warnings.warn(warning, stacklevel=2)
    failed = sum(len(s["failed"]) for s in finished.values())
    ok = sum(s["ok"] for s in finished.values())
    computed = sum(len(spec.chunk_range(c)) for c in todo)
    return JobSummary(spec.count, ok, failed, seconds, len(done), computed, spec.chunks, len(redone), spread)


def _run_local(worker: Worker, todo: list[int], progress) -> None:
    """Decoding runs ahead of the engine (two chunks) and writing behind it, in threads: the engine
    releases the GIL, so they overlap with it. Progress moves per batch; each batch's overlays are drawn
    in the writer thread as the batch finishes."""
    with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        loads = deque(loader.submit(worker.load, c) for c in todo[:2])
        writes = deque()

        def on_batch(results, files):
            if worker.spec.overlays and results:
                writes.append(writer.submit(worker.write_overlays, results, files))
            progress.update(len(results))

        for i, chunk in enumerate(todo):
            loaded = loads.popleft().result()
            if i + 2 < len(todo):
                loads.append(loader.submit(worker.load, todo[i + 2]))
            computed = worker.compute(loaded, on_batch)
            failed = len(worker.spec.chunk_range(chunk)) - len(computed[1])
            if failed:
                progress.update(failed)
            writes.append(writer.submit(worker.write, chunk, computed))
            while len(writes) > 1 or (writes and writes[0].done()):
                writes.popleft().result()  # a write error (disk full, permissions) stops the job here
        for future in writes:
            future.result()


def _run_dask(spec: JobSpec, todo: list[int], workers, scheduler, progress) -> None:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise JobError("--workers and --scheduler need Dask: pip install 'fastsal[dask]'") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        saved = dict(os.environ)
        try:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
        finally:  # Dask sets OMP_NUM_THREADS=1 and others for its workers in this process too
            os.environ.clear()
            os.environ.update(saved)
        client = Client(cluster)
    # Keys and the plugin's name are this run's own: two jobs on one scheduler never share a task.
    plugin = f"fastsal-job-{spec.job_id}"
    try:
        client.register_plugin(JobPlugin(spec), name=plugin)
        futures = [
            client.submit(
                _dask_chunk, spec.job_id, chunk, key=f"fastsal-{spec.job_id}-chunk-{chunk}", pure=False
            )
            for chunk in todo
        ]
        for future in as_completed(futures):
            summary = future.result()
            progress.update(len(spec.chunk_range(summary["chunk"])))
    finally:
        try:
            client.unregister_worker_plugin(plugin)
        except Exception:  # noqa: BLE001 - a closing or lost cluster: nothing to unload
            pass
        client.close()
        if cluster is not None:
            cluster.close()


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # the dask extra is optional
    WorkerPlugin = object


class JobPlugin(WorkerPlugin):
    """Loads the net once per Dask worker and job: every chunk task of the job reuses it."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def setup(self, worker):
        if not hasattr(worker, "fastsal_jobs"):
            worker.fastsal_jobs = {}
        # A worker of someone's cluster uses the threads it was started with (dask worker --nthreads).
        threads = getattr(getattr(worker, "state", None), "nthreads", None)
        worker.fastsal_jobs[self.spec.job_id] = Worker(self.spec, threads=threads)

    def teardown(self, worker):
        getattr(worker, "fastsal_jobs", {}).pop(self.spec.job_id, None)


def _dask_chunk(job_id: str, chunk: int) -> dict:
    from distributed import get_worker

    return get_worker().fastsal_jobs[job_id].process(chunk)


def status(output) -> dict:
    """What a store holds: the plan, chunks done, images ok / failed (with reasons) / pending."""
    import zarr

    from ._evaluate_job import convergence_delta, summaries  # it builds on this module

    out = Path(output)
    if not (out.exists() or out.is_symlink()):
        raise JobError(f"no such store: {output}")
    meta = _read_meta(out)
    if meta is None:
        raise JobError(f"{output} is not a fastsal store")
    group = zarr.open_group(str(output), mode="r")
    plan = meta["plan"]
    count, chunk = plan["inputs"]["count"], plan["chunk_size"]
    done = done_chunks(str(output), -(-count // chunk))
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
        "metrics": summaries(output),  # fastsal evaluate's, per metric
        "convergence_delta": convergence_delta(output),  # integrated_gradients stores
    }
