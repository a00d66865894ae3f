"""Pictures of maps: one definition of the heat-map overlay (the photo in colour under the map, a caption
and a colour bar), for the demo, the jobs' --overlays and ``fastsal export --png``. Rendered with
matplotlib's object API (no pyplot state: overlays are drawn in a writer thread)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SEQUENTIAL, DIVERGING = "inferno", "bwr"  # unsigned maps: 0 dark; signed maps: 0 white, centred
_MIN_WIDTH = 360  # small photos are enlarged (whole pixels) so that the caption and colour bar fit
_MAX_SIDE = 4096  # pixels: the tallest an enlarged photo may get
_CAPTION_PX, _BAR_PX, _DPI = 44, 46, 100


@dataclass(frozen=True)
class OverlayStyle:
    """How overlays look. ``cmap`` None: inferno for unsigned maps, bwr (centred on zero) for signed
    ones. ``alpha``: the map's opacity where it is strongest; it fades with |value| so the photo shows
    where the map is near zero. ``outlier_perc``: the top percent of |values| saturate the colours
    (Captum's visualize_image_attr outlier_perc, default 2). ``labels``: class names, line i class i."""

    cmap: str | None = None
    alpha: float = 0.7
    outlier_perc: float = 2.0
    labels: tuple[str, ...] | None = None

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.outlier_perc < 100:
            raise ValueError(f"outlier_perc must be in [0, 100), got {self.outlier_perc}")
        if self.cmap is not None:
            import matplotlib

            if self.cmap not in matplotlib.colormaps:
                raise ValueError(
                    f"unknown colour map {self.cmap!r} (matplotlib's names: inferno, viridis, bwr, ...)"
                )

    def colormap(self, signed: bool):
        import matplotlib

        return matplotlib.colormaps[self.cmap or (DIVERGING if signed else SEQUENTIAL)]

    def name(self, class_id: int) -> str | None:
        return self.labels[class_id] if self.labels is not None and 0 <= class_id < len(self.labels) else None


def color_limit(saliency_map: np.ndarray, outlier_perc: float = 2.0) -> float:
    """The |value| at which colours saturate: the (100 - outlier_perc) percentile of the map's finite
    |values|, as Captum's visualize_image_attr scales; 1 for a map that is zero everywhere."""
    values = np.abs(saliency_map[np.isfinite(saliency_map)])
    limit = float(np.percentile(values, 100 - outlier_perc)) if values.size else 0.0
    if limit <= 0:
        limit = float(values.max()) if values.size and values.max() > 0 else 1.0
    return limit


def blend(photo: np.ndarray, saliency_map: np.ndarray, colormap, alpha: float, limit: float, signed: bool):
    """The photo (H, W, 3) uint8 in colour under the map (H, W), (H, W, 3) floats in [0, 1]. Signed maps
    are centred on zero (colormap's middle); the map's opacity is alpha * |value| / limit. Where the map
    is NaN (outside the net's centre crop) the photo is dimmed: the net never saw it."""
    base = photo.astype(np.float32) / 255.0
    known = np.isfinite(saliency_map)
    scaled = np.where(known, saliency_map, 0.0) / limit
    scaled = np.clip(scaled, -1.0, 1.0) if signed else np.clip(scaled, 0.0, 1.0)
    colours = colormap((scaled + 1) / 2 if signed else scaled)[..., :3]
    weight = (alpha * np.abs(scaled))[..., None]
    base = np.where(known[..., None], base, 0.4 * base)
    return np.clip(base * (1 - weight) + colours * weight, 0, 1)


def overlay(photo: np.ndarray, saliency_map: np.ndarray, colormap, signed: bool = False) -> np.ndarray:
    """:func:`blend` of a map at OverlayStyle's defaults (the demo's panels); a signed map takes the
    diverging colour map (centred on zero) in place of ``colormap``."""
    style = OverlayStyle()
    colours = style.colormap(True) if signed else colormap
    return blend(
        photo, saliency_map, colours, style.alpha, color_limit(saliency_map, style.outlier_perc), signed
    )


def figure_layout(height: int, width: int) -> tuple[int, int, int]:
    """(scale, photo_top, figure_height) in pixels: the photo enlarged by whole pixels to
    _MIN_WIDTH at least (never past _MAX_SIDE tall: a 1 x 2000 photo would need 720,000 rows),
    under the caption, above the colour bar."""
    scale = max(1, min(math.ceil(_MIN_WIDTH / width), _MAX_SIDE // max(height, 1)))
    return scale, _CAPTION_PX, _CAPTION_PX + height * scale + _BAR_PX


def save_overlay(path, photo, saliency_map, caption: str, style: OverlayStyle, signed: bool) -> None:
    """A PNG of the photo (H, W, 3) uint8 under the map (H, W), at the photo's own pixel size (enlarged
    by whole pixels when narrower than _MIN_WIDTH), with ``caption`` above and a colour bar below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    height, width = photo.shape[:2]
    scale, top, total = figure_layout(height, width)
    colormap = style.colormap(signed)
    limit = color_limit(saliency_map, style.outlier_perc)
    picture = blend(photo, saliency_map, colormap, style.alpha, limit, signed)
    if scale > 1:
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    fig = Figure(figsize=(width * scale / _DPI, total / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.add_axes((0, _BAR_PX / total, 1, height * scale / total))
    axes.imshow(picture, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    chars = max(20, int(width * scale / 6.5))  # what fits at 9 pt
    lines = [line if len(line) <= chars else line[: chars - 1] + "…" for line in caption.splitlines()]
    fig.text(0.5, 1 - (top / 2) / total, "\n".join(lines), ha="center", va="center", fontsize=9)
    bar = fig.add_axes((0.06, 0.5 * _BAR_PX / total, 0.88, 0.22 * _BAR_PX / total))
    norm = Normalize(-limit if signed else 0.0, limit)
    fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), cax=bar, orientation="horizontal")
    # the value in every label: the axis's offset text ("1e-5") falls outside this short figure
    bar.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    bar.tick_params(labelsize=7)
    fig.savefig(path, dpi=_DPI)


def input_picture(x: np.ndarray) -> np.ndarray:
    """A net input (C, H, W) of unknown preprocessing as a picture (H, W, 3) uint8: stretched from its
    minimum to its maximum, 3 channels taken as Caffe's BGR (classify.py's channel swap undone)."""
    x = np.asarray(x, np.float32)
    low, high = float(np.min(x)), float(np.max(x))
    picture = (x - low) / (high - low) if high > low else np.zeros_like(x)
    picture = picture[::-1] if picture.shape[0] == 3 else picture[:1].repeat(3, axis=0)
    return (picture.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
