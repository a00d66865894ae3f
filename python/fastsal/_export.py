"""Results a person can look at, out of a store: overlays (PNG) at the photo's own resolution, maps (one
.npy per image) and a table (CSV), for ``fastsal export`` and the jobs' ``--overlays``. Every folder it
writes carries the jobs' overlays marker: fastsal never overwrites files it did not write."""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path

import numpy as np

from . import jobs
from ._preprocess import ImageError, Preprocessing, decode_image
from ._visualize import OverlayStyle, input_picture, save_overlay

# Methods whose maps are >= 0 whatever the reduction: squares, variances.
_UNSIGNED_METHODS = ("smoothgrad_sq", "vargrad")
CSV_HEAD = ["index", "path", "status", "reason"]
_STATUS = ("pending", "ok", "failed")  # jobs.PENDING, OK, FAILED


def signed_maps(plan: dict) -> bool:
    """Whether the plan's maps carry a sign: reduce="sum" or occlusion's "mean" (except squares and
    variances), or a CAM without its ReLU. absmax maps, the gradients' default, are |values|."""
    options = plan.get("options", {})
    if plan.get("method") in _UNSIGNED_METHODS:
        return False
    return options.get("reduce") in ("sum", "mean") or options.get("relu") is False


def preprocessing_of(plan: dict) -> Preprocessing | None:
    """The plan's resize and crop (all that maps need to find their place on the photo)."""
    described = plan.get("preprocessing")
    if described is None:
        return None
    dims = described.get("images_dim")
    return Preprocessing(tuple(described["input_shape"]), images_dim=None if dims is None else tuple(dims))


def photo_of(data: bytes) -> np.ndarray:
    """The picture (H, W, 3) uint8 as fastsal decodes it, in colour whatever the net takes."""
    return (decode_image(data, color=True) * 255 + 0.5).astype(np.uint8)


def caption(class_id: int, score: float, probability: float | None, style: OverlayStyle, where: str) -> str:
    name = style.name(class_id)
    what = f"class {class_id}" + (f" {name}" if name else "")
    shown = (
        "" if probability is None else f"{probability:.3f}" if probability >= 1e-3 else f"{probability:.1e}"
    )
    value = f"score {score:.4g}" + (f", p {shown}" if shown else "")
    return f"{what}: {value}\n{where}"


def save_image_overlays(folder, index, stem, photo, maps, ids, scores, probabilities, plan, style) -> int:
    """One overlay per class of one image: maps (K, h, w) of the net's input placed on the photo through
    the plan's resize and crop (a .npy input's photo is the input itself). Returns the files written."""
    preprocessing = preprocessing_of(plan)
    where = f"{stem} ({plan['method']})"
    for map_, class_id in zip(maps, ids):
        class_id = int(class_id)
        placed = map_ if preprocessing is None else preprocessing.to_original(map_, photo.shape[:2])
        signed = signed_maps(plan) or bool(np.nanmin(placed) < 0)
        probability = None if probabilities is None else float(probabilities[class_id])
        text = caption(class_id, float(scores[class_id]), probability, style, where)
        if not np.nanmax(np.abs(placed), initial=0) > 0:  # a Grad-CAM whose ReLU removed everything
            text = text.replace("\n", "; the map is zero everywhere\n", 1)
        save_overlay(
            Path(folder) / jobs.overlay_name(index, stem, class_id), photo, placed, text, style, signed
        )
    return len(ids)


def _stem(paths, index: int) -> str:
    return Path(str(paths[index])).stem if paths is not None else "input"


def _ok_images(group, plan: dict, chunks):
    """(index, maps (K, h, w), classes (K,), scores, probabilities or None) of each ok image of the
    given chunks, read chunk by chunk."""
    count, size = plan["inputs"]["count"], plan["chunk_size"]
    has_probabilities = "probabilities" in group
    for chunk in chunks:
        block = slice(chunk * size, min((chunk + 1) * size, count))
        status = group["status"][block]
        maps, classes, scores = group["maps"][block], group["classes"][block], group["scores"][block]
        probabilities = group["probabilities"][block] if has_probabilities else None
        for row in np.flatnonzero(status == jobs.OK):
            yield (
                block.start + int(row),
                maps[row],
                classes[row],
                scores[row],
                None if probabilities is None else probabilities[row],
            )


def write_store_overlays(
    output, folder, style: OverlayStyle, chunks=None, progress=None
) -> tuple[int, list[str]]:
    """Overlays of a store's finished images into ``folder`` (claimed with the marker). Images whose
    file changed or vanished since its chunk read it are skipped (their map would land on another
    picture): returns (overlays written, those paths)."""
    import zarr

    out = Path(output).resolve()
    meta = jobs._read_meta(out)
    plan = meta["plan"]
    group = zarr.open_group(str(out), mode="r")
    paths = group["paths"][:] if "paths" in group else None
    total = -(-plan["inputs"]["count"] // plan["chunk_size"])
    done = jobs.done_chunks(str(out), total)
    chunks = sorted(done) if chunks is None else [c for c in chunks if c in done]
    array = None
    if paths is None:
        array = np.load(_npy_input(out, meta), mmap_mode="r")
    folder = jobs.claim_folder(Path(folder).resolve(), out)
    written, skipped = 0, []
    for index, maps, ids, scores, probabilities in _ok_images(group, plan, chunks):
        if paths is None:
            photo = input_picture(array[index])
        else:
            path = str(paths[index])
            identity = done[index // plan["chunk_size"]].get("files", {}).get(str(index))
            try:
                if identity is not None and not jobs._unchanged(path, identity):
                    raise ImageError("changed")
                with open(path, "rb") as f:
                    photo = photo_of(f.read())
            except (OSError, ImageError):
                skipped.append(path)
                continue
        written += save_image_overlays(
            folder, index, _stem(paths, index), photo, maps, ids, scores, probabilities, plan, style
        )
        if progress is not None:
            progress.update(1)
    return written, skipped


def _npy_input(out: Path, meta: dict) -> str:
    """The .npy a store's job read (recorded beside the plan), refused when it is no longer that file."""
    import hashlib

    source = meta.get("array")
    if source is None:
        raise jobs.JobError(f"{out} does not record where its .npy of inputs is (a store from before it did)")
    if not os.path.isfile(source):
        raise jobs.JobError(f"{out} was computed from a .npy of inputs that is no longer at {source}")
    if hashlib.sha256(jobs._sha256(source).encode()).hexdigest() != meta["plan"]["inputs"]["sha256"]:
        raise jobs.JobError(f"{source} has changed since {out} was computed from it: no overlays on it")
    return source


def write_npy(output, folder) -> int:
    """One ``<index>_<stem>.npy`` per finished ok image: its maps (K, H, W) float32 at the net's input
    size, in the order of the store's classes row (the CSV names them). Returns the files written."""
    import zarr

    out = Path(output).resolve()
    plan = jobs._read_meta(out)["plan"]
    group = zarr.open_group(str(out), mode="r")
    paths = group["paths"][:] if "paths" in group else None
    done = jobs.done_chunks(str(out), -(-plan["inputs"]["count"] // plan["chunk_size"]))
    folder = jobs.claim_folder(Path(folder).resolve(), out)
    written = 0
    for index, maps, *_ in _ok_images(group, plan, sorted(done)):
        name = jobs.overlay_name(index, _stem(paths, index), 0)[: -len("_class0.png")] + ".npy"
        np.save(folder / name, np.asarray(maps, np.float32))
        written += 1
    return written


def csv_header(k: int) -> list[str]:
    return CSV_HEAD + [
        f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "name", "score", "probability")
    ]


def write_csv(output, path, labels: tuple[str, ...] | None = None) -> int:
    """The table of a store, one row per image: index, path, status (ok, failed, pending), the failure's
    reason, then for each of its K classes the id, name (with labels), score and probability (empty
    when the store holds none). Written whole under a temporary name, then renamed: a file already at
    ``path`` is replaced only when it is a table fastsal exported (its header row is this one)."""
    import zarr

    out = Path(output).resolve()
    info = jobs.status(out)
    group = zarr.open_group(str(out), mode="r")
    count, size = info["images"], info["plan"]["chunk_size"]
    done = jobs.done_chunks(str(out), info["chunks"])  # a chunk without its marker claims nothing: pending
    has_probabilities = "probabilities" in group
    paths = group["paths"][:] if "paths" in group else None
    header = csv_header(group["classes"].shape[1])
    target = Path(path)
    check_csv(target, header)
    reasons = {f["index"]: f["reason"] for f in info["failed"]}
    text = io.StringIO()
    table = csv.writer(text, lineterminator="\n")
    table.writerow(header)
    for chunk in range(info["chunks"]):  # chunk by chunk: scores are (N, classes), large for big jobs
        block = slice(chunk * size, min((chunk + 1) * size, count))
        status = group["status"][block] if chunk in done else np.full(block.stop - block.start, jobs.PENDING)
        classes, scores = group["classes"][block], group["scores"][block]
        probabilities = group["probabilities"][block] if has_probabilities else None
        for row_index, index in enumerate(range(block.start, block.stop)):
            state = int(status[row_index])
            row = [index, "" if paths is None else str(paths[index]), _STATUS[state], reasons.get(index, "")]
            for class_id in classes[row_index]:
                if state != jobs.OK:
                    row += ["", "", "", ""]
                    continue
                class_id = int(class_id)
                name = labels[class_id] if labels is not None else ""
                probability = "" if probabilities is None else f"{probabilities[row_index, class_id]:.6g}"
                row += [class_id, name, f"{scores[row_index, class_id]:.6g}", probability]
            table.writerow(row)
    temporary = target.parent / f".{target.name}.fastsal-{os.getpid()}"
    temporary.write_text(text.getvalue(), encoding="utf-8")
    os.replace(temporary, target)
    return count


def check_csv(target: Path, header: list[str]) -> None:
    """Refuses a table path fastsal may not write: a folder, or a file that is no table fastsal exported."""
    if target.is_dir():
        raise jobs.JobError(f"{target} is a folder; --csv takes a file name")
    if not target.parent.is_dir():
        raise jobs.JobError(f"cannot write {target}: its folder {target.parent} does not exist")
    if target.exists() or target.is_symlink():
        try:
            with open(target, encoding="utf-8", newline="") as f:
                first = next(csv.reader(f), None)
        except (OSError, UnicodeDecodeError):
            first = None
        if target.is_symlink() or first != header:
            raise jobs.JobError(
                f"{target} exists and is not a table fastsal exported from this kind of store; fastsal "
                "overwrites nothing it did not write: choose another file"
            )


def export(output, png=None, npy=None, csv_path=None, style: OverlayStyle | None = None, quiet=False) -> dict:
    """``fastsal export``: any of overlays (png folder), maps (npy folder) and the table (csv_path) of a
    store, finished or not (what is not done yet is left out, or listed as pending). Every output is
    checked before any is written. Returns the counts written and the files skipped."""
    from tqdm import tqdm

    out = Path(output).resolve()
    info = jobs.status(out)  # JobError for a store that is none
    style = style or OverlayStyle()
    for folder in (png, npy):
        if folder is not None:
            jobs._check_overlays(Path(folder).resolve(), out)
    if csv_path is not None:
        import zarr

        k = zarr.open_group(str(out), mode="r")["classes"].shape[1]
        check_csv(Path(csv_path), csv_header(k))
    result = {"overlays": 0, "npy": 0, "rows": 0, "skipped": [], "info": info}
    if png is not None:
        with tqdm(total=info["ok"], unit="img", disable=True if quiet else None) as progress:
            result["overlays"], result["skipped"] = write_store_overlays(out, png, style, progress=progress)
        if result["skipped"]:
            warnings.warn(
                f"no overlays for {len(result['skipped'])} images whose files changed or vanished since the "
                f"run read them (first: {result['skipped'][0]})",
                stacklevel=2,
            )
    if npy is not None:
        result["npy"] = write_npy(out, npy)
    if csv_path is not None:
        result["rows"] = write_csv(out, csv_path, style.labels)
    return result
