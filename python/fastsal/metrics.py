"""Are the maps any good? Faithfulness and randomisation metrics of attribution maps (issue 23), one
class per metric with its paper's parameters as keyword arguments (as Quantus keeps them); every
perturbed copy of an image is built on demand and streamed through fastsal's forward-only engine."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import tempfile
from dataclasses import dataclass

import caffe
import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg

from . import _core
from ._attribution import _OPTIONS as _METHOD_OPTIONS
from ._attribution import Attribution
from ._forward import Forward, softmax
from ._load import _quiet_caffe

ENGINE_OPTIONS = ("score", "input", "batch_size", "fast_layers", "exact", "device", "threads")


# ---- shared pieces ----


def ranking(maps: np.ndarray) -> np.ndarray:
    """Each map's pixels in decreasing order of value, (..., H * W) int64. Ties keep raster order (the
    lower flat index first): a stable sort of the negated map. RISE's np.flip(np.argsort(...)) leaves
    ties to quicksort; only maps with tied values (a constant region, a ReLU's zeros) can differ."""
    flat = maps.reshape(*maps.shape[:-2], -1)
    return np.argsort(-flat, axis=-1, kind="stable")


def positions(order: np.ndarray) -> np.ndarray:
    """The inverse of a ranking: each pixel's place in it, (..., H * W) int32."""
    places = np.empty(order.shape, np.int32)
    np.put_along_axis(places, order, np.arange(order.shape[-1], dtype=np.int32), axis=-1)
    return places


def trapezoid_auc(curve: np.ndarray) -> np.ndarray:
    """RISE's normalised area under a curve of n equally spaced points over [0, 1], last axis:
    (sum - first / 2 - last / 2) / (n - 1)."""
    curve = np.asarray(curve, np.float64)
    return (curve.sum(axis=-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / (curve.shape[-1] - 1)


def gaussian_kernel(klen: int = 11, sigma: float = 5.0) -> np.ndarray:
    """RISE's ``gkern``: a klen x klen delta smoothed by scipy.ndimage.gaussian_filter(sigma) (its
    default reflecting edges, truncated at 4 sigma), so the weights sum to 1."""
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    return scipy.ndimage.gaussian_filter(delta, sigma)


def blur(images: np.ndarray, klen: int = 11, sigma: float = 5.0) -> np.ndarray:
    """Each channel convolved with :func:`gaussian_kernel`, zeros beyond the edge (RISE's insertion
    substrate: torch's conv2d with padding klen // 2). (N, C, H, W) float32."""
    kernel = gaussian_kernel(klen, sigma)[None, None]
    out = scipy.ndimage.correlate(images.astype(np.float64), kernel, mode="constant", cval=0.0)
    return out.astype(np.float32)


def _check_number(name: str, value, low: float | None = None, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a finite number'}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


@dataclass
class _Context:
    """What every metric may need for one evaluation: the inputs, the maps, and how to recompute them."""

    net: caffe.Net
    images: np.ndarray  # (N, C, H, W) float32
    classes: np.ndarray  # (N, K) int32
    maps: np.ndarray  # (N, K, H, W) float32
    method: str | None
    options: dict
    engine: dict
    forward: Forward

    def pixel_maps(self) -> np.ndarray:
        """The maps as one value per pixel: (N, K, C, H, W) maps are summed over channels."""
        return self.maps.sum(axis=2) if self.maps.ndim == 5 else self.maps

    def probabilities(self, scores: np.ndarray, softmax_scores: bool) -> np.ndarray:
        return softmax(scores) if softmax_scores else scores


class Metric:
    """A metric of attribution maps; :func:`evaluate` runs it. ``name`` keys its results."""

    name = ""
    needs_method = False  # recomputes the maps (of perturbed inputs or randomised nets)

    def run(self, context: _Context) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def keywords(cls) -> list[str]:
        """The options the metric's constructor takes (its paper's parameters)."""
        return list(inspect.signature(cls).parameters)


# ---- deletion and insertion (RISE) ----


class _Causal(Metric):
    def __init__(self, *, step: int | None = None, softmax: bool = True):
        if step is not None:
            _check_number("step", step, 1, integer=True)
        if not isinstance(softmax, bool):
            raise TypeError(f"softmax must be True or False, got {softmax!r}")
        self.step = step
        self.softmax = softmax

    def substrate(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, finish): the image at step 0 and what each ranked pixel becomes."""
        raise NotImplementedError

    def run(self, context):
        return causal_curves(context, [self])[self.name]


class Deletion(_Causal):
    """Deletion (Petsiuk et al., RISE, BMVC 2018, section 4.1): the map's pixels, most important
    first, ``step`` at a time, set to ``baseline`` in every channel; after each step, the class
    probability p_c = softmax(scores)_c. The curve has ceil(H * W / step) + 1 points (the untouched
    image first, the fully deleted one last); the score is its area by the trapezoid rule over [0, 1]
    (RISE's ``auc``). Lower is better. ``baseline`` (default 0.0, RISE's zero substrate) is in the
    net's preprocessed input space (after mean subtraction and scaling: 0 is the mean image); a
    scalar or a (C, H, W) or (N, C, H, W) array. ``step`` defaults to the image width (RISE: 224 on
    224 x 224 images). Ties in the map: see :func:`ranking`. ``softmax=False`` takes the raw scores.
    """

    name = "deletion"

    def __init__(self, *, step: int | None = None, baseline=0.0, softmax: bool = True):
        super().__init__(step=step, softmax=softmax)
        try:
            self.baseline = np.asarray(baseline, np.float32)
        except (TypeError, ValueError):
            raise TypeError(f"baseline must be a number or an array of numbers, got {baseline!r}") from None
        if not np.isfinite(self.baseline).all():
            raise ValueError("baseline contains NaN or Inf")

    def substrate(self, images):
        b = self.baseline
        if b.ndim not in (0, 3, 4) or (b.ndim and b.shape[-3:] != images.shape[1:]):
            raise ValueError(f"baseline must be a scalar or {images.shape[1:]} images, got shape {b.shape}")
        if b.ndim == 4 and len(b) != len(images):
            raise ValueError(f"baseline has {len(b)} images but there are {len(images)}")
        return images, np.broadcast_to(b, images.shape)


class Insertion(_Causal):
    """Insertion (Petsiuk et al., RISE, BMVC 2018, section 4.1): start from a blurred copy of the
    image and put the map's pixels back, most important first, ``step`` at a time; the class
    probability after each step, its curve (ceil(H * W / step) + 1 points, the blurred image first)
    and area (trapezoid). Higher is better. The blur is RISE's: each channel convolved with a
    ``klen`` x ``klen`` (11) Gaussian of ``sigma`` (5) (:func:`gaussian_kernel`), zeros beyond the
    edge, in the net's preprocessed input space. ``step``, ``softmax``: as :class:`Deletion`.
    """

    name = "insertion"

    def __init__(self, *, step: int | None = None, klen: int = 11, sigma: float = 5.0, softmax: bool = True):
        super().__init__(step=step, softmax=softmax)
        _check_number("klen", klen, 1, integer=True)
        _check_number("sigma", sigma, 0)
        self.klen, self.sigma = klen, sigma

    def substrate(self, images):
        return blur(images, self.klen, self.sigma), images


def causal_curves(context: _Context, metrics: list[_Causal]) -> dict[str, dict[str, np.ndarray]]:
    """Deletion and insertion curves of every (image, class) pair and metric, all rows in one stream:
    row (metric m, pair p, step i) is built when its batch comes, from the pair's pixel ranking."""
    images, classes = context.images, context.classes
    n, k = classes.shape
    h, w = images.shape[-2:]
    pixels = h * w
    places = positions(ranking(context.pixel_maps())).reshape(n * k, pixels)
    plans = []  # (metric, first row, points, step, start, finish)
    first = 0
    for metric in metrics:
        step = min(metric.step or w, pixels)  # a larger step is the same one-step curve, no overflow
        points = -(-pixels // step) + 1
        start, finish = metric.substrate(images)
        plans.append((metric, first, points, step, start, finish))
        first += n * k * points
    curves = [np.empty((n * k, plan[2]), np.float64) for plan in plans]
    bounds = np.array([plan[1] for plan in plans] + [first])

    def rows(begin, end):
        row = np.arange(begin, end)
        which = np.searchsorted(bounds, row, side="right") - 1
        out = np.empty((len(row), *images.shape[1:]), np.float32)
        for m in np.unique(which):
            _, base, points, step, start, finish = plans[m]
            local = row[which == m] - base
            pair, i = local // points, local % points
            image = pair // k
            changed = places[pair] < (step * i)[:, None]
            out[which == m] = np.where(changed.reshape(-1, 1, h, w), finish[image], start[image])
        return out

    def consume(begin, end, scores):
        row = np.arange(begin, end)
        which = np.searchsorted(bounds, row, side="right") - 1
        for m in np.unique(which):
            metric, base, points, _, _, _ = plans[m]
            local = row[which == m] - base
            pair, i = local // points, local % points
            values = context.probabilities(scores[which == m], metric.softmax)
            curves[m][pair, i] = values[np.arange(len(pair)), classes.reshape(-1)[pair]]

    context.forward.stream(first, rows, consume)
    return {
        plan[0].name: {plan[0].name: trapezoid_auc(c).reshape(n, k), "curve": c.reshape(n, k, -1)}
        for plan, c in zip(plans, curves)
    }


# ---- ROAD (remove and debias) ----

# Rong et al.'s noisy linear imputation: each removed pixel is the weighted mean of its 8 neighbours
# (1/6 beside, 1/12 diagonal; those beyond the edge left out), solved jointly for all removed pixels.
_NEIGHBOURS = (
    (1, 1, 1 / 12),
    (0, 1, 1 / 6),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (0, -1, 1 / 6),
    (-1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (-1, 0, 1 / 6),
)


@functools.lru_cache(maxsize=8)
def dissection_places(h: int, w: int, leaf: int = 16) -> np.ndarray:
    """Each pixel's place (H * W,) in a nested dissection of the h x w grid: the longer side halved by
    a line of pixels (which separates the two halves for the 8-neighbour stencil), each half ordered
    the same way, the line last; blocks of at most ``leaf`` pixels in raster order. Eliminating the
    unknowns in this order keeps the factor of :func:`linear_imputation`'s matrix sparse."""
    places = np.empty((h, w), np.int64)
    count = 0
    regions = [(0, h, 0, w, False)]  # depth first; a region's separator is placed after its halves
    while regions:
        r0, r1, c0, c1, separator = regions.pop()
        rows, cols = r1 - r0, c1 - c0
        if rows <= 0 or cols <= 0:
            continue
        if separator or rows * cols <= leaf:
            places[r0:r1, c0:c1] = count + np.arange(rows * cols).reshape(rows, cols)
            count += rows * cols
        elif rows >= cols:
            m = r0 + rows // 2
            regions += [(m, m + 1, c0, c1, True), (m + 1, r1, c0, c1, False), (r0, m, c0, c1, False)]
        else:
            m = c0 + cols // 2
            regions += [(r0, r1, m, m + 1, True), (r0, r1, m + 1, c1, False), (r0, r1, c0, m, False)]
    return places.reshape(-1)


def linear_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The removed pixels' values (C, len(removed)) of a (C, H, W) image under noisy linear imputation
    without its noise: for each removed pixel i, S_i x_i - sum_{j removed} w_ij x_j = sum_{j kept}
    w_ij x_j, S_i the sum of its in-image neighbours' weights; one sparse solve per image and set.
    The matrix is symmetric and diagonally dominant, positive definite unless every pixel is removed
    (then nothing is left to interpolate from: the values are 0, the singular system's minimum-norm
    solution, as spsolve returned); it is factorised without pivoting, its unknowns in nested dissection order
    (:func:`dissection_places`): 1.5-4x faster than spsolve's general ordering, the same values."""
    c, h, w = image.shape
    if len(removed) == h * w:
        return np.zeros((c, h * w))
    flat = image.reshape(c, h * w).astype(np.float64)
    count = len(removed)
    placed = np.argsort(dissection_places(h, w)[removed])
    removed = removed[placed]  # unknown u is pixel removed[u], in elimination order
    unknown = np.full(h * w, -1, np.int64)
    unknown[removed] = np.arange(count)
    rows_, cols, weights = [np.arange(count)], [np.arange(count)], [np.zeros(count)]
    rhs = np.zeros((count, c))
    total = np.zeros(count)
    y, x = np.divmod(removed, w)
    for dy, dx, weight in _NEIGHBOURS:
        ny, nx = y + dy, x + dx
        valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        neighbour = ny[valid] * w + nx[valid]
        ids = np.flatnonzero(valid)
        total[ids] += weight
        var = unknown[neighbour]
        inside = var >= 0
        rows_.append(ids[inside])
        cols.append(var[inside])
        weights.append(np.full(inside.sum(), -weight))
        rhs[ids[~inside]] += weight * flat[:, neighbour[~inside]].T
    weights[0] = total
    matrix = scipy.sparse.csc_matrix(
        (np.concatenate(weights), (np.concatenate(rows_), np.concatenate(cols))), shape=(count, count)
    )
    factor = scipy.sparse.linalg.splu(
        matrix, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
    )
    values = np.empty((c, count))
    values[:, placed] = factor.solve(rhs).T  # back to the caller's order of removed pixels
    return values


class _Road(Metric):
    order = ""

    def __init__(self, *, percentages=None, noise: float = 0.01, seed: int = 0, output: str = "probability"):
        if percentages is None:
            percentages = range(1, 100, 2)
        elif isinstance(percentages, numbers.Number):  # one percentage, as MPRT takes one layer
            percentages = [percentages]
        self.percentages = list(percentages)
        if not self.percentages:
            raise ValueError("percentages is empty")
        for p in self.percentages:
            _check_number("percentages", p, 0)
            if p > 100:
                raise ValueError(f"percentages must lie in [0, 100], got {p}")
        _check_number("noise", noise, 0)
        _check_number("seed", seed, 0, integer=True)
        if output not in ("probability", "accuracy"):
            raise ValueError(f"output must be 'probability' or 'accuracy', got {output!r}")
        self.noise, self.seed, self.output = noise, seed, output

    def noise_for(self, image: int, column: int, index: int, shape) -> np.ndarray:
        """The noise added to the imputed values, (C, k) for the k removed pixels in ranking order."""
        return self.noise * np.random.default_rng([self.seed, image, column, index]).standard_normal(shape)

    def removed(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the pixel order, (P,) how many pixels each percentage removes: int(H * W * p / 100))."""
        pixels = maps.shape[-1] * maps.shape[-2]
        order = ranking(maps if self.order == "morf" else -maps)
        return order, np.array([int(pixels * p / 100) for p in self.percentages])

    def run(self, context):
        images, classes = context.images, context.classes
        n, k = classes.shape
        c, h, w = images.shape[1:]
        order, counts = self.removed(context.pixel_maps())
        order = order.reshape(n * k, h * w)
        points = len(counts)
        curve = np.empty((n * k, points), np.float64)

        def rows(begin, end):
            out = np.empty((end - begin, c, h, w), np.float32)
            for r, row in enumerate(range(begin, end)):
                pair, j = divmod(row, points)
                image = images[pair // k]
                removed = order[pair, : counts[j]]
                flat = image.reshape(c, h * w).astype(np.float64)
                if len(removed):
                    values = linear_imputation(image, removed)
                    flat[:, removed] = values + self.noise_for(pair // k, pair % k, j, values.shape)
                out[r] = flat.reshape(c, h, w)
            return out

        def consume(begin, end, scores):
            pair, j = np.divmod(np.arange(begin, end), points)
            target = classes.reshape(-1)[pair]
            if self.output == "accuracy":
                curve[pair, j] = scores.argmax(axis=1) == target
            else:
                curve[pair, j] = softmax(scores)[np.arange(len(pair)), target]

        context.forward.stream(n * k * points, rows, consume)
        return {self.name: curve.mean(axis=1).reshape(n, k), "curve": curve.reshape(n, k, points)}


class RoadMoRF(_Road):
    """ROAD, most relevant first (Rong, Leemann et al., ICML 2022; Quantus ``ROAD``,
    pytorch-grad-cam ``ROADMostRelevantFirst``): for each of ``percentages`` (default 1, 3, ..., 99,
    Quantus's), the int(H * W * p / 100) pixels the map ranks highest (:func:`ranking`) are removed
    and filled by noisy linear imputation (:func:`linear_imputation` plus ``noise`` (0.01, Quantus's)
    times N(0, 1) per channel and pixel, drawn from numpy.random.default_rng([seed, image, class
    column, percentage index]), in ranking order), in the net's preprocessed input space. The curve
    holds, per percentage, the class probability (``output="probability"``, softmax of the scores)
    or whether the class is still the top one (``"accuracy"``, Quantus's); the score is the curve's
    mean over the percentages. Lower is better.
    """

    name = "road_morf"
    order = "morf"


class RoadLeRF(_Road):
    """ROAD, least relevant first: :class:`RoadMoRF` with the pixels the map ranks lowest removed
    first (ascending order; ties: the lower flat index first). Higher is better."""

    name = "road_lerf"
    order = "lerf"


# ---- MPRT (model parameter randomisation) ----


def net_copy(net: caffe.Net) -> caffe.Net:
    """A new caffe.Net of the same definition (``_core.net_prototxt``) and input shapes, holding copies
    of the weights: it shares no memory with ``net``, so randomising it leaves ``net`` as it was."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "net.prototxt")
        with open(path, "w") as f:
            f.write(_core.net_prototxt(net))
        with _quiet_caffe():  # Caffe's per-layer INFO lines, on the user's terminal, at every evaluate
            copy = caffe.Net(path, caffe.TEST)
    for name in net.inputs:
        copy.blobs[name].reshape(*net.blobs[name].data.shape)
    copy.reshape()
    for name, blobs in net.params.items():
        for source, target in zip(blobs, copy.params[name]):
            target.data[...] = np.copy(source.data)
    return copy


def random_weights(net: caffe.Net, layer: str, seed: int) -> list[np.ndarray]:
    """The re-initialised parameter blobs of ``layer``: BatchNorm's statistics reset to mean 0 and
    variance 1, Scale to gamma 1 and beta 0 (what torch's reset_parameters does to BatchNorm, as in
    Quantus); every other blob (convolution, inner product, PReLU weights and biases) drawn from
    N(0, s^2), s the standard deviation of the blob's trained values (Adebayo et al. re-draw from the
    training initialiser's scale), from numpy.random.default_rng([seed, i]), i the layer's index
    among the layers with parameters, bottom up: the same draws in either order."""
    index = list(net.params).index(layer)
    kind = net.layers[list(net._layer_names).index(layer)].type
    blobs = [b.data for b in net.params[layer]]
    if kind == "BatchNorm":
        return [np.zeros_like(blobs[0]), np.ones_like(blobs[1]), np.ones_like(blobs[2])]
    if kind == "Scale":
        return [np.ones_like(blobs[0]), *(np.zeros_like(b) for b in blobs[1:])]
    rng = np.random.default_rng([seed, index])
    return [rng.normal(0.0, float(b.std()), b.shape).astype(np.float32) for b in blobs]


def ranks(maps: np.ndarray) -> np.ndarray:
    """Each row's values (last axis) replaced by their ranks, ties given their average rank (scipy's
    rankdata, as spearmanr ranks), float64."""
    import scipy.stats  # here: it costs `import fastsal` half a second

    return scipy.stats.rankdata(maps, axis=-1)


def rank_correlation(ranks_a: np.ndarray, ranks_b: np.ndarray) -> np.ndarray:
    """Pearson correlation of rows of ranks (:func:`ranks`), last axis: Spearman's rank correlation as
    scipy's spearmanr computes it, for every row at once; NaN where a row is constant."""
    a = ranks_a - ranks_a.mean(axis=-1, keepdims=True)
    b = ranks_b - ranks_b.mean(axis=-1, keepdims=True)
    norms = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > 0, (a * b).sum(axis=-1) / norms, np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps, ties given their average rank (scipy's, Quantus's);
    NaN where a map is constant."""
    return float(rank_correlation(ranks(a.ravel()), ranks(b.ravel())))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (scikit-image) of two (H, W) maps as Quantus 0.6.0 computes it: the data range is that of
    both maps together, the window 7 (or the largest odd size the map allows)."""
    import skimage.metrics

    window = min(7, *(d - 1 + d % 2 for d in a.shape))
    data_range = float(max(a.max(), b.max()) - min(a.min(), b.min()))
    if data_range == 0:
        return 1.0
    return float(skimage.metrics.structural_similarity(a, b, win_size=window, data_range=data_range))


def hog_features(m: np.ndarray) -> np.ndarray:
    """scikit-image's ``hog`` of an (H, W) map: 9 orientations, cells of min(8, H // 4, W // 4) pixels
    (at least 2), 2 x 2 cell blocks."""
    import skimage.feature

    cell = max(2, min(8, m.shape[0] // 4, m.shape[1] // 4))
    return skimage.feature.hog(m, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))


def hog_similarity(a: np.ndarray, b: np.ndarray, *, features_a: np.ndarray | None = None) -> float:
    """Pearson correlation of the two maps' HOG features (Adebayo et al.; :func:`hog_features`).
    ``features_a``: a's features, when already computed."""
    features = [hog_features(a) if features_a is None else features_a, hog_features(b)]
    if np.ptp(features[0]) == 0 or np.ptp(features[1]) == 0:
        return float("nan")
    return float(np.corrcoef(*features)[0, 1])


class _Similarities:
    """MPRT's similarities of each step's maps with the original ones, per (image, class); what depends
    on the original maps alone (their ranks, normalised maps, HOG features) is computed once."""

    def __init__(self, maps: np.ndarray, chosen: list[str]):
        self.chosen = chosen
        n, k = maps.shape[:2]
        if "spearman_abs" in chosen:
            self.abs_ranks = ranks(np.abs(maps).reshape(n, k, -1))
        if "spearman" in chosen:
            self.signed_ranks = ranks(maps.reshape(n, k, -1))
        if "ssim" in chosen or "hog" in chosen:
            self.normalised = _normalised(maps)
        if "hog" in chosen:
            self.hog = [[hog_features(m) for m in row] for row in self.normalised]

    def __call__(self, maps: np.ndarray) -> dict[str, np.ndarray]:
        n, k = maps.shape[:2]
        out = {}
        if "spearman_abs" in self.chosen:
            out["spearman_abs"] = rank_correlation(self.abs_ranks, ranks(np.abs(maps).reshape(n, k, -1)))
        if "spearman" in self.chosen:
            out["spearman"] = rank_correlation(self.signed_ranks, ranks(maps.reshape(n, k, -1)))
        if "ssim" in self.chosen or "hog" in self.chosen:
            normalised = _normalised(maps)
            pairs = [(i, j) for i in range(n) for j in range(k)]
            if "ssim" in self.chosen:
                out["ssim"] = np.array([ssim(self.normalised[i, j], normalised[i, j]) for i, j in pairs])
            if "hog" in self.chosen:
                out["hog"] = np.array(
                    [
                        hog_similarity(self.normalised[i, j], normalised[i, j], features_a=self.hog[i][j])
                        for i, j in pairs
                    ]
                )
            for name in ("ssim", "hog"):
                if name in out:
                    out[name] = out[name].reshape(n, k)
        return out


def _normalised(maps: np.ndarray) -> np.ndarray:
    """|map| per pixel (channels summed first) divided by its maximum (a zero map stays zero), (N, K, H, W)."""
    pixel = np.abs(maps.sum(axis=2) if maps.ndim == 5 else maps)
    peak = pixel.max(axis=(-2, -1), keepdims=True)
    return pixel / np.where(peak > 0, peak, 1)


class MPRT(Metric):
    """Model parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS
    2018; Quantus ``MPRT``). The layers with parameters are re-initialised (:func:`random_weights`)
    from the top down, one more at each step (``order="cascading"``, Quantus's ``"top_down"``), or one
    at a time with the others trained (``"independent"``), in a fastsal-internal copy of the net
    (:func:`net_copy`: the user's weights never change); at each step the method is recomputed with
    the same options (and noise seed) and compared with the original map, per (image, class):

    - ``spearman_abs``: Spearman rank correlation of |map| (the paper's; Quantus's default, abs=True),
    - ``spearman``: of the signed maps,
    - ``ssim``: SSIM of |map| / max |map| (Quantus's abs and normalise_by_max; :func:`ssim`),
    - ``hog``: Pearson correlation of the HOG features of |map| / max |map| (:func:`hog_similarity`).

    ``similarities``: which of these to compute (default all four; Quantus computes one, its
    ``similarity_func``, Spearman by default: ``similarities=["spearman_abs"]`` does the same work).
    ``layers``: the layers to randomise (default: every layer with parameters), taken top down;
    ``final_only`` (Quantus's ``skip_layers``) compares only after the last step. The score is the
    first of ``similarities`` (``spearman_abs`` by default) after the last step for cascading, its
    mean over the layers for independent; a map that stays similar as the net loses its training fails
    the test. ``seed`` (42, Quantus's). Results: ``mprt`` (N, K), and per similarity (N, K, steps),
    ``mprt_layers`` the layer names. One engine serves every step: the copy's weights are re-drawn in
    place and the engine reloads them (:meth:`Attribution.reload_weights`), so a step costs a map.
    """

    name = "mprt"
    needs_method = True
    SIMILARITIES = ("spearman_abs", "spearman", "ssim", "hog")

    def __init__(
        self,
        *,
        order: str = "cascading",
        layers=None,
        seed: int = 42,
        final_only: bool = False,
        similarities=SIMILARITIES,
    ):
        if order not in ("cascading", "independent"):
            raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
        _check_number("seed", seed, 0, integer=True)
        if not isinstance(final_only, bool):
            raise TypeError(f"final_only must be True or False, got {final_only!r}")
        chosen = [similarities] if isinstance(similarities, str) else similarities
        try:
            chosen = list(chosen)
            unknown = [name for name in chosen if name not in self.SIMILARITIES]
        except TypeError:  # None, a number: no names at all
            chosen, unknown = [], [similarities]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"similarities must name some of {', '.join(self.SIMILARITIES)}, each once, got {similarities!r}"
            )
        self.order, self.layers, self.seed, self.final_only = order, layers, seed, final_only
        self.similarities = chosen  # a list: the metric's settings are recorded as JSON

    def steps(self, net: caffe.Net) -> list[str]:
        names = list(net.params)
        layers = [self.layers] if isinstance(self.layers, str) else self.layers  # one name, as similarities
        chosen = names if layers is None else list(layers)
        unknown = [name for name in chosen if name not in names]
        if unknown or not chosen:
            raise ValueError(f"layers must name layers with parameters ({', '.join(names)}), got {chosen}")
        return sorted(set(chosen), key=names.index, reverse=True)

    def run(self, context):
        steps = self.steps(context.net)
        copy = net_copy(context.net)
        # Built once: each step writes the copy's weights in place (the engine shares their memory).
        attribution = Attribution(copy, context.method, **context.engine, **context.options)
        similarities = _Similarities(context.maps, self.similarities)
        n, k = context.classes.shape
        shown = [t for t in range(len(steps)) if not self.final_only or t == len(steps) - 1]
        out = {name: np.full((n, k, len(shown)), np.nan) for name in self.similarities}
        column = 0
        for t, layer in enumerate(steps):
            if self.order == "independent" and t:
                for blob, trained in zip(copy.params[steps[t - 1]], context.net.params[steps[t - 1]]):
                    blob.data[...] = trained.data
            for blob, values in zip(copy.params[layer], random_weights(context.net, layer, self.seed)):
                blob.data[...] = values
            if t not in shown:
                continue
            attribution.reload_weights()
            for name, values in similarities(attribution.compute(context.images, context.classes)).items():
                out[name][..., column] = values
            column += 1
        first = out[self.similarities[0]]
        score = first[..., -1] if self.order == "cascading" else first.mean(axis=2)
        return {self.name: score, **out, "layers": np.array([steps[t] for t in shown])}


# ---- infidelity and max-sensitivity (Captum's) ----


def _per_element(maps: np.ndarray, image_shape) -> np.ndarray:
    """(N, K, C, H, W) attributions; (N, K, H, W) maps broadcast over the channels."""
    return maps if maps.ndim == 5 else np.broadcast_to(maps[:, :, None], (*maps.shape[:2], *image_shape))


class Infidelity(Metric):
    """Infidelity (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019;
    Captum ``captum.metrics.infidelity``): for ``samples`` (10, Captum's n_perturb_samples)
    perturbations I_s of each image, the mean over s of (sum(I_s * a) - (f(x) - f(x - I_s)))^2, f
    the class score (the score blob, as Captum's forward_func returns the model's output; ``softmax``
    for probabilities) and a the attributions ((N, K, H, W) maps are broadcast over the channels: use
    ``reduce="none"`` for per-element attributions). I_s ~ N(0, ``stdev``^2) per input element
    (``stdev`` 0.003, Captum's documented perturb_fn), drawn from numpy.random.default_rng([seed,
    image, s]), in the preprocessed input space, one perturbed copy per (image, sample) shared by the
    image's classes. ``normalize`` (False, Captum's): the attributions scaled first by beta = sum_s
    (a . I_s) d_s / sum_s (a . I_s)^2, d_s = f(x) - f(x - I_s). Lower is better.
    """

    name = "infidelity"

    def __init__(
        self,
        *,
        samples: int = 10,
        stdev: float = 0.003,
        seed: int = 0,
        normalize: bool = False,
        softmax: bool = False,
    ):
        _check_number("samples", samples, 1, integer=True)
        _check_number("stdev", stdev, 0)
        _check_number("seed", seed, 0, integer=True)
        for name, value in (("normalize", normalize), ("softmax", softmax)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.samples, self.stdev, self.seed, self.normalize, self.softmax = (
            samples,
            stdev,
            seed,
            normalize,
            softmax,
        )

    def perturbation(self, image: int, sample: int, shape) -> np.ndarray:
        return (self.stdev * np.random.default_rng([self.seed, image, sample]).standard_normal(shape)).astype(
            np.float32
        )

    def run(self, context):
        images, classes = context.images, context.classes
        n, k = classes.shape
        samples = self.samples
        attributions = _per_element(context.maps, images.shape[1:])
        dots = np.empty((n, samples, k))
        values = np.empty((n, samples, k))

        def rows(begin, end):
            out = np.empty((end - begin, *images.shape[1:]), np.float32)
            for r, row in enumerate(range(begin, end)):
                i, s = divmod(row, samples)
                noise = self.perturbation(i, s, images.shape[1:])
                dots[i, s] = (attributions[i].astype(np.float64) * noise).reshape(k, -1).sum(axis=1)
                out[r] = images[i] - noise
            return out

        def consume(begin, end, scores):
            i, s = np.divmod(np.arange(begin, end), samples)
            f = softmax(scores) if self.softmax else scores
            values[i, s] = f[np.arange(len(i))[:, None], classes[i]]

        context.forward.stream(n * samples, rows, consume)
        clean = context.forward.scores(images)
        clean = softmax(clean) if self.softmax else clean
        difference = (
            clean[np.arange(n)[:, None], classes].astype(np.float64)[:, None] - values
        )  # (n, samples, k)
        if self.normalize:
            a2, ab, b2 = (dots**2).sum(axis=1), (dots * difference).sum(axis=1), (difference**2).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                beta = np.where(a2 == 0, ab, ab / np.where(a2 == 0, 1, a2))  # Captum's safe_div
            return {self.name: (beta**2 * a2 - 2 * beta * ab + b2) / samples}
        return {self.name: ((dots - difference) ** 2).mean(axis=1)}


class MaxSensitivity(Metric):
    """Max-sensitivity (Yeh et al., NeurIPS 2019; Captum ``captum.metrics.sensitivity_max``): the
    method recomputed on ``samples`` (10) copies x + d_s of each image, d_s uniform in
    [-``radius``, ``radius``] per input element (0.02, Captum's L-infinity ball; from
    numpy.random.default_rng([seed, image, s]), in the preprocessed input space), and the largest
    ||e(x + d_s) - e(x)|| / ||e(x)|| over s, per (image, class), the Frobenius norm over the map (a
    zero ||e(x)|| counts as 1, as Captum). Lower is better.
    """

    name = "max_sensitivity"
    needs_method = True

    def __init__(self, *, samples: int = 10, radius: float = 0.02, seed: int = 0):
        _check_number("samples", samples, 1, integer=True)
        _check_number("radius", radius, 0)
        _check_number("seed", seed, 0, integer=True)
        self.samples, self.radius, self.seed = samples, radius, seed

    def perturbation(self, image: int, sample: int, shape) -> np.ndarray:
        rng = np.random.default_rng([self.seed, image, sample])
        return rng.uniform(-self.radius, self.radius, shape).astype(np.float32)

    def run(self, context):
        images, classes = context.images, context.classes
        n, k = classes.shape
        attribution = Attribution(context.net, context.method, **context.engine, **context.options)
        original = context.maps.reshape(n, k, -1).astype(np.float64)
        norm = np.linalg.norm(original, axis=2)
        norm[norm == 0] = 1.0
        worst = np.zeros((n, k))
        for s in range(self.samples):  # one sample of every image at a time: memory of one set of maps
            noisy = images + np.stack([self.perturbation(i, s, images.shape[1:]) for i in range(n)])
            maps = attribution.compute(noisy, classes).reshape(n, k, -1)
            worst = np.maximum(worst, np.linalg.norm(maps - original, axis=2) / norm)
        return {self.name: worst}


# ---- evaluate ----

METRICS = {
    "deletion": Deletion,
    "insertion": Insertion,
    "road_morf": RoadMoRF,
    "road_lerf": RoadLeRF,
    "mprt": MPRT,
    "infidelity": Infidelity,
    "max_sensitivity": MaxSensitivity,
}


def _metric(item) -> Metric:
    if isinstance(item, Metric):
        return item
    if isinstance(item, str) and item in METRICS:
        return METRICS[item]()
    raise ValueError(
        f"unknown metric {item!r}; fastsal has: {', '.join(METRICS)} (or a fastsal.metrics object)"
    )


def evaluate(
    net: caffe.Net,
    images,
    classes,
    metrics=("deletion", "insertion"),
    *,
    method: str | None = "saliency",
    maps=None,
    convergence_delta: bool = False,
    **options,
) -> dict[str, np.ndarray]:
    """Scores of attribution maps for ``images`` and ``classes`` (every form :meth:`Saliency.compute`
    takes). ``metrics``: names (``"deletion"``, ``"insertion"``, ...) for their defaults, or metric
    objects (``fastsal.metrics.Deletion(step=56)``). The maps are ``method``'s (any of
    ``fastsal.METHODS``, with its ``**options``; the engine's options ``score``, ``input``,
    ``batch_size``, ``exact``, ``device``, ``threads`` apply to every forward pass), or precomputed
    ``maps`` ((N, K, H, W), or (N, K, C, H, W) summed over channels where a metric ranks pixels).

    Returns a dict: each metric's name -> (N, K) float64 scores, and ``name + "_curve"`` -> its
    curves where it has them ((N, K, points)). ``convergence_delta=True`` (integrated_gradients)
    adds ``"convergence_delta"``: |sum of the attributions - (F(x) - F(baseline))| / |F(x) -
    F(baseline)| per (image, class), F the class score (Captum's delta, relative).
    """
    chosen = [_metric(item) for item in ([metrics] if isinstance(metrics, (str, Metric)) else metrics)]
    names = [metric.name for metric in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"each metric may appear once, got {names}")
    engine = {key: options.pop(key) for key in ENGINE_OPTIONS if key in options}
    method_takes = _METHOD_OPTIONS.get(method, {}) if maps is None else {}
    misplaced = sorted(
        (key, type(metric).__name__)
        for metric in chosen
        for key in metric.keywords()
        if key in options and key not in method_takes  # seed: SmoothGrad's and MPRT's alike
    )
    if misplaced:  # a metric's option given to evaluate would reach the method as an unknown option
        raise TypeError(
            "evaluate's keyword options go to the method; a metric's go to its object: "
            + ", ".join(f"fastsal.metrics.{cls}({key}=...)" for key, cls in misplaced)
        )
    if maps is not None and convergence_delta:
        raise ValueError("convergence_delta needs method='integrated_gradients', not precomputed maps")
    forward = Forward(net, **engine)
    batch, single = forward._engine._images(images)
    if single:
        raise ValueError("evaluate takes (N, C, H, W) images; add the N axis to one image")
    ids = forward._engine._classes(classes, len(batch))
    results: dict[str, np.ndarray] = {}
    if maps is None:
        if method is None:
            raise ValueError("give a method or precomputed maps")
        attribution = Attribution(net, method, **engine, **options)
        if convergence_delta:
            maps, delta = attribution.compute(batch, ids, return_convergence_delta=True)
            results["convergence_delta"] = _relative_delta(attribution, forward, batch, ids, delta)
        else:
            maps = attribution.compute(batch, ids)
        if maps.shape[-2:] != batch.shape[-2:]:
            raise ValueError(
                f"the metrics take maps of the input's size {batch.shape[-2:]}, {method!r} gave {maps.shape[-2:]} "
                "(upsample=False keeps the layer's size)"
            )
    else:
        if options:
            raise TypeError(f"options {sorted(options)} are a method's, but maps were given")
        maps = _check_maps(maps, batch.shape, ids.shape)
        needing = [metric.name for metric in chosen if metric.needs_method]
        if needing:
            raise ValueError(f"{', '.join(needing)} recompute the maps: give method=, not maps=")
        method = None
    context = _Context(net, np.asarray(batch, np.float32), ids, maps, method, options, engine, forward)
    causal = [metric for metric in chosen if isinstance(metric, _Causal)]
    done = causal_curves(context, causal) if causal else {}
    for metric in chosen:
        out = done[metric.name] if metric.name in done else metric.run(context)
        for key, value in out.items():
            results[metric.name if key == metric.name else f"{metric.name}_{key}"] = value
    return results


def _check_maps(maps, image_shape, class_shape) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.dtype == np.bool_ or not np.issubdtype(maps.dtype, np.number) or np.iscomplexobj(maps):
        raise TypeError(f"maps must hold real numbers, got dtype {maps.dtype}")
    n, c, h, w = image_shape
    allowed = ((*class_shape, h, w), (*class_shape, c, h, w))
    if maps.shape not in allowed:
        raise ValueError(
            f"maps must be {allowed[0]} or {allowed[1]} for these images and classes, got {maps.shape}"
        )
    maps = maps.astype(np.float32)
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or Inf")
    return maps


def _relative_delta(attribution, forward, images, classes, delta) -> np.ndarray:
    baselines = (
        np.concatenate([attribution._baseline_for(s, 1) for s in range(len(images))])
        if len(images)
        else images
    )
    rows = np.arange(len(images))[:, None]
    change = (
        forward.scores(images)[rows, classes].astype(np.float64) - forward.scores(baselines)[rows, classes]
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(delta) / np.abs(change)
