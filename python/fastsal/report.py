"""``fastsal report``: a static HTML report of one or more stores over the same images, opened from disk
with no server. An index lists every image; a page per chunk shows each image's classes, probabilities,
scores, status and its maps per class and per store (method) side by side, sorted and filtered in the page.

Maps travel as numbers, not pictures: each is shrunk to at most ``map_side`` pixels a side, quantised to
one byte per pixel relative to its largest magnitude, and coloured in the browser on a canvas, so one
colour scale per map or per page is a switch (no second set of PNGs) and a page stays a few hundred KB.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from . import jobs
from ._export import signed_maps
from ._labels import read_labels
from ._load import _listed

MARKER = ".fastsal-report"  # in a report folder: the files fastsal wrote there (a rerun replaces only those)
ASSETS = ("report.css", "report.js")
# What a browser shows in an <img>; other inputs (TIFF, PPM, ...) get a link only.
SHOWN_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}
STATUS = {jobs.PENDING: "pending", jobs.OK: "ok", jobs.FAILED: "failed"}
_FILES = Path(__file__).with_name("report_files")


class ReportError(ValueError):
    """A report refused before anything is written: bad stores, labels, overlays or output folder."""


@dataclass
class _Store:
    """One store, opened for reading: its arrays stay in Zarr and are read a page at a time."""

    path: str
    label: str
    group: object
    plan: dict
    count: int
    paths: list[str] | None
    reasons: dict[int, str]  # failed images' reasons, from the chunks' markers
    metrics: dict[str, object]  # name -> (image, class) array
    overlays: Path | None = None
    overlay_files: frozenset = frozenset()
    signed: bool = False  # signed by its plan, or some map has negative values: a diverging colour scale


def _open(path: str) -> _Store:
    import zarr

    info = jobs.status(path)  # refuses what is no fastsal store; reads the failure reasons
    # Not the consolidated metadata: arrays added after the job (probabilities, metrics/*) count too.
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    metrics = {}
    if "metrics" in group:
        for name, array in sorted(group["metrics"].arrays()):
            if array.ndim != 2:  # a metric's curves or per-step values (evaluate's <name>_curve, mprt_*)
                continue
            if array.shape[0] != info["images"]:
                raise ReportError(
                    f"{path}: metrics/{name} has shape {array.shape}; a metric holds (image, class) values"
                )
            metrics[name] = array
    return _Store(
        path=str(path),
        label=info["plan"]["method"],
        group=group,
        plan=info["plan"],
        count=info["images"],
        paths=[str(p) for p in group["paths"][:]] if "paths" in group else None,
        reasons={f["index"]: f["reason"] for f in info["failed"]},
        metrics=metrics,
        signed=signed_maps(info["plan"]),  # as fastsal export decides; negative values found add to it
    )


def _same_images(stores: list[_Store]) -> None:
    first = stores[0]
    for other in stores[1:]:
        a, b = first.plan["inputs"], other.plan["inputs"]
        if (a["count"], a["sha256"]) != (b["count"], b["sha256"]):
            detail = (
                f"{a['count']} vs {b['count']} images"
                if a["count"] != b["count"]
                else "the same number of images, but other files"
            )
            raise ReportError(
                f"{first.path} and {other.path} are over different image lists ({detail}); a report puts "
                "maps side by side only for the same images: give stores of one image list"
            )


def _name_columns(stores: list[_Store]) -> None:
    """Distinct column names: the method, with the store's folder name where two stores share a method."""
    methods = [s.label for s in stores]
    for store in stores:
        if methods.count(store.label) > 1:
            store.label = f"{store.label} ({Path(store.path).name})"


def _attach_overlays(stores: list[_Store], folders: list[str]) -> None:
    if len(folders) > len(stores):
        raise ReportError(
            f"{len(folders)} overlays folders for {len(stores)} stores: give one per store, in order"
        )
    for store, folder in zip(stores, folders):
        where = Path(folder).resolve()
        try:
            owner = (where / jobs.OVERLAYS_MARKER).read_text().strip()
        except OSError:
            raise ReportError(
                f"{folder} is no overlays folder of fastsal run (it has no {jobs.OVERLAYS_MARKER})"
            ) from None
        if owner != str(Path(store.path).resolve()):
            raise ReportError(f"{folder} holds the overlays of {owner}, not of {store.path}")
        store.overlays = where
        store.overlay_files = frozenset(os.listdir(where))  # one listing, not a stat per image


def shrink(maps: np.ndarray, side: int) -> np.ndarray:
    """(..., H, W) maps shrunk by an integer factor to at most ``side`` pixels a side: each output pixel
    the mean of its block, the edge blocks padded with their edge values (skimage's block_reduce pads
    with a constant, which would dim a map's last row and column)."""
    h, w = maps.shape[-2:]
    factor = max(1, math.ceil(max(h, w) / side))
    if factor == 1:
        return maps
    ph, pw = -h % factor, -w % factor
    padded = np.pad(maps, [(0, 0)] * (maps.ndim - 2) + [(0, ph), (0, pw)], mode="edge")
    blocks = padded.reshape(*maps.shape[:-2], (h + ph) // factor, factor, (w + pw) // factor, factor)
    return blocks.mean(axis=(-3, -1))


def quantise(small: np.ndarray) -> tuple[str, float]:
    """One (h, w) map as base64 bytes q = round(127 v / max|v|) + 128 (zero is 128), and max|v|."""
    top = float(np.abs(small).max())
    q = np.round(127 * small / top) + 128 if top > 0 else np.full(small.shape, 128)
    return base64.b64encode(q.astype(np.uint8).tobytes()).decode(), top


def _href(target: str | Path, folder: Path) -> str:
    """A link from the report folder to a file, relative so the report opens from disk (file://)."""
    return quote(os.path.relpath(target, folder))


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _page_rows(stores, start, stop, names, out, side):
    """The rows of images start..stop: what the templates show and the sort/filter keys."""
    first = stores[0]
    block = slice(start, stop)
    read = []
    for store in stores:
        group = store.group
        read.append(
            {
                "maps": shrink(group["maps"][block], side),
                "classes": group["classes"][block],
                "scores": group["scores"][block],
                "probabilities": group["probabilities"][block] if "probabilities" in group else None,
                "status": group["status"][block],
                "metrics": {name: array[block] for name, array in store.metrics.items()},
            }
        )
    rows = []
    for row in range(stop - start):
        index = start + row
        path = first.paths[index] if first.paths else None
        state = STATUS.get(int(read[0]["status"][row]), "unknown")
        data = read[0]
        k = max(len(r["classes"][row]) for r in read)
        classes = []
        for slot in range(k):
            cells = []
            for store, got in zip(stores, read):
                ids = got["classes"][row]
                if slot >= len(ids) or ids[slot] < 0 or int(got["status"][row]) != jobs.OK:
                    cells.append(None)
                    continue
                small = got["maps"][row, slot]
                store.signed |= bool((small < 0).any())
                q, top = quantise(small)
                # named as fastsal's overlays are; a .npy input's stem is "input"
                overlay = jobs.overlay_name(index, Path(path).stem if path else "input", int(ids[slot]))
                cells.append(
                    {
                        "q": q,
                        "max": top,
                        "h": small.shape[0],
                        "w": small.shape[1],
                        "class_id": int(ids[slot]),
                        "name": names(int(ids[slot])),
                        "overlay": _href(store.overlays / overlay, out)
                        if overlay in store.overlay_files
                        else None,
                        "metrics": {
                            m: _number(v[row, slot]) for m, v in got["metrics"].items() if slot < v.shape[1]
                        },
                    }
                )
            ids = data["classes"][row]
            class_id = int(ids[slot]) if slot < len(ids) and ids[slot] >= 0 else None
            prob = data["probabilities"]
            classes.append(
                {
                    "id": class_id,
                    "name": None if class_id is None else names(class_id),
                    "score": None if class_id is None else _number(data["scores"][row, class_id]),
                    "prob": None if class_id is None or prob is None else _number(prob[row, class_id]),
                    "cells": cells,
                }
            )
        keys = {"index": index, "status": state}
        if classes and classes[0]["id"] is not None:
            keys["score"] = classes[0]["score"]
            keys["prob"] = classes[0]["prob"]
        for store, got in zip(stores, read):  # each metric of the top class, a sort and filter key
            for name, values in got["metrics"].items():
                keys[_metric_key(store, name, stores)] = _number(values[row, 0]) if values.shape[1] else None
        rows.append(
            {
                "index": index,
                "path": path,
                "name": Path(path).name if path else f"input {index}",
                "photo": _href(path, out) if path else None,
                # a failed file may be no picture at all: a link, not a broken <img>
                "shown": bool(path) and state == "ok" and Path(path).suffix.lower() in SHOWN_SUFFIXES,
                "status": state,
                "reason": first.reasons.get(index),
                "classes": classes,
                "keys": keys,
                "search": " ".join(f"{c['id']} {c['name']}".lower() for c in classes if c["id"] is not None),
            }
        )
    return rows


def _index_entry(row: dict, page: int) -> dict:
    """What the index lists of an image (its table is made in the browser from these)."""
    ids = [c["id"] for c in row["classes"] if c["id"] is not None]
    return {
        "keys": row["keys"],
        "ids": ids,
        "search": row["search"],
        "page": _page_name(page),
        "path": row["path"],
        "name": row["name"],
        "reason": row["reason"],
        "names": [c["name"] for c in row["classes"] if c["id"] is not None],
    }


def _metric_key(store, name, stores) -> str:
    return f"{name} ({store.label})" if len(stores) > 1 else name


def _fields(stores) -> list[tuple[str, str]]:
    """The numeric sort and filter keys: (key, what the menus call it)."""
    fields = [("index", "image number"), ("score", "top class score")]
    if "probabilities" in stores[0].group:
        fields.append(("prob", "top class probability"))
    for store in stores:
        fields += [
            (_metric_key(store, n, stores), f"{_metric_key(store, n, stores)}, top class")
            for n in store.metrics
        ]
    return fields


def _claim(out: Path, names: set[str]) -> set[str]:
    """The report folder is new, empty or an earlier report's (its marker lists the files fastsal wrote
    there); returns those earlier files. A file of ours to write that fastsal did not write is refused."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} is a file, not a folder; choose another output")
    if not out.exists() or not any(out.iterdir()):
        return set()
    try:
        earlier = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ReportError(
            f"{out} holds files that fastsal report did not write; fastsal overwrites nothing it did not "
            "make: choose a new or empty folder"
        ) from None
    clash = sorted(n for n in names - earlier if (out / n).exists() or (out / n).is_symlink())
    if clash:
        raise ReportError(
            f"{out} holds {_listed(clash, 3)}, which fastsal report did not write; move it out first"
        )
    return earlier


def _write_marker(out: Path, files: set[str]) -> None:
    temporary = out / f"{MARKER}.{os.getpid()}"
    temporary.write_text(json.dumps({"files": sorted(files)}))
    os.replace(temporary, out / MARKER)


def _luts() -> dict:
    """The colour maps as 256 RGB triples: inferno (as the overlays) and a diverging one centred on zero."""
    from matplotlib import colormaps

    ramp = np.linspace(0, 1, 256)
    return {
        name: (np.asarray(colormaps[cmap](ramp))[:, :3] * 255).round().astype(int).ravel().tolist()
        for name, cmap in (("sequential", "inferno"), ("diverging", "RdBu_r"))
    }


def write_report(
    stores,
    output,
    *,
    labels=None,
    overlays=(),
    page_size: int | None = None,
    map_side: int = 64,
    quiet: bool = True,
) -> Path:
    """Writes the report of ``stores`` (paths of fastsal stores over the same images) into the folder
    ``output``: index.html, page-NNNN.html (``page_size`` images each, default the first store's chunk),
    assets/. ``labels``: a class names file (Caffe's synset_words.txt); ``overlays``: the overlays folder
    of each store, in order. Returns the index's path."""
    try:
        from jinja2 import Environment, FileSystemLoader, select_autoescape
    except ImportError:
        raise ReportError(
            "fastsal report needs jinja2 and matplotlib: pip install 'fastsal[report]'"
        ) from None
    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    if not stores:
        raise ReportError("give at least one store")
    if map_side < 1:
        raise ReportError(f"map_side must be positive, got {map_side}")
    opened = [_open(s) for s in stores]
    _same_images(opened)
    _name_columns(opened)
    _attach_overlays(opened, list(overlays))
    first = opened[0]
    num_classes = first.group["scores"].shape[1]
    names_list = None if labels is None else read_labels(labels, num_classes)

    def names(class_id: int) -> str:
        return names_list[class_id] if names_list else f"class {class_id}"

    size = page_size or first.plan["chunk_size"]
    if size < 1:
        raise ReportError(f"page_size must be positive, got {size}")
    pages = max(1, -(-first.count // size))
    out = Path(output).resolve()
    files = {"index.html", *(f"assets/{a}" for a in ASSETS), "assets/meta.js"}
    files |= {_page_name(p) for p in range(pages)}
    earlier = _claim(out, files)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    _write_marker(out, files | earlier)  # before writing: an interrupted report is still ours
    for asset in ASSETS:
        shutil.copyfile(_FILES / asset, out / "assets" / asset)

    env = Environment(loader=FileSystemLoader(_FILES), autoescape=select_autoescape(["html"]))
    env.filters["num"] = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else ""
    common = {
        "stores": opened,
        "fields": _fields(opened),
        "pages": pages,
        "has_prob": "probabilities" in first.group,
        "page_name": _page_name,
    }
    from tqdm import tqdm

    index_rows = []
    page_template = env.get_template("page.html")
    for page in tqdm(range(pages), unit="page", disable=True if quiet else None):
        start, stop = page * size, min((page + 1) * size, first.count)
        rows = _page_rows(opened, start, stop, names, out, map_side)
        (out / _page_name(page)).write_text(
            page_template.render(common, rows=rows, page=page, first=start, last=stop - 1)
        )
        index_rows += [_index_entry(row, page) for row in rows]
    meta = {"signed": [s.signed for s in opened], "labels": [s.label for s in opened], "luts": _luts()}
    (out / "assets" / "meta.js").write_text(f"window.FASTSAL_META = {json.dumps(meta)};\n")
    counts = {name: sum(r["keys"]["status"] == name for r in index_rows) for name in STATUS.values()}
    columns = [key for key, _ in common["fields"] if key != "index"]
    (out / "index.html").write_text(
        env.get_template("index.html").render(
            common, rows=index_rows, counts=counts, columns=columns, page=-1
        )
    )
    for stale in earlier - files:  # an earlier report's pages beyond this one's
        path = out / stale
        if path.is_file() and not path.is_symlink():
            path.unlink()
    _write_marker(out, files)
    return out / "index.html"


def _page_name(page: int) -> str:
    return f"page-{page + 1:04d}.html"
