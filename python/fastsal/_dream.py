"""Images optimised by gradient ascent on the input, on fastsal's internal net (weight gradients off):
class-model visualisation (Simonyan et al. 2013, Yosinski et al. 2015), K classes as K rows of one
batch, and deep dream (Google's 2015 notebook), octave by octave at any image size."""

from __future__ import annotations

import numbers

import caffe
import numpy as np

from . import _core
from ._preprocess import Preprocessing
from ._saliency import Saliency, _check_net, _check_positive_int, batch_slices

PRESETS = {
    # Simonyan et al.: the L2-regularised class score, plain gradient ascent (their lambda is
    # decay / (2 learning_rate)).
    "simonyan": {"learning_rate": 1.0, "decay": 2e-4, "blur_radius": 0.0, "blur_every": 0, "jitter": 0},
    # Yosinski et al.'s published best set: decay 1e-4, Gaussian blur of radius 1.0 every 4 steps,
    # constant learning rate 100.
    "yosinski": {"learning_rate": 100.0, "decay": 1e-4, "blur_radius": 1.0, "blur_every": 4, "jitter": 0},
}


def _valid_range(preprocessing: Preprocessing | None, channels: int):
    """(low, high) per channel of the net's input for pixels in [0, 1], or None (no clipping)."""
    if preprocessing is None:
        return None
    shape = preprocessing.input_shape
    zeros = np.zeros((shape[1], shape[2], channels), np.float32)
    low, high = preprocessing(zeros), preprocessing(zeros + 1)
    return np.minimum(low, high), np.maximum(low, high)


def _check_number(name: str, value, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def visualize_classes(
    net: caffe.Net,
    classes,
    *,
    iterations: int = 200,
    preset: str | None = None,
    learning_rate: float = 1.0,
    decay: float = 0.0,
    blur_radius: float = 0.0,
    blur_every: int = 0,
    jitter: int = 0,
    clip_norm_percentile: float = 0.0,
    start: str = "noise",
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
    score: str | None = None,
    input: str | None = None,  # noqa: A002
    batch_size: int | None = None,
    return_scores: bool = False,
):
    """Images (K, C, H, W) in the net's input space that maximise each class's pre-softmax score.

    All K classes are K rows of one batch: each iteration is one genuine forward at that batch (so
    MaxPool, BatchNorm and LRN state is right) and one data-only backward with every row seeded with
    its own class, then for every image: x += learning_rate * gradient (after undoing a random roll of
    up to ``jitter`` pixels), x *= 1 - decay (L2 decay), a Gaussian blur of ``blur_radius`` every
    ``blur_every`` iterations, pixels whose norm over channels is below the ``clip_norm_percentile``-th
    percentile set to 0, and, with ``preprocessing``, clipping to the pixels' valid range.
    ``preset="simonyan"`` or ``"yosinski"`` sets those to the papers' values (explicit arguments do not
    override a preset). ``start``: ``"noise"`` (seeded N(0, 1), the default: from a zero image a ReLU
    net's gradient can vanish) or ``"zeros"`` (Simonyan's). Each row's
    randomness comes from ``default_rng([seed, class])``, so a batch of classes equals the classes one at
    a time. Cost per iteration: one forward and one backward of K rows. With ``return_scores``, also
    the (iterations + 1, K) target scores along the way (the last after the final update).
    """
    _check_net(net)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        learning_rate, decay, blur_radius, blur_every, jitter = (
            PRESETS[preset][k] for k in ("learning_rate", "decay", "blur_radius", "blur_every", "jitter")
        )
    _check_positive_int("iterations", iterations)
    learning_rate = _check_number("learning_rate", learning_rate, 0, strict=True)
    decay = _check_number("decay", decay, 0)
    blur_radius = _check_number("blur_radius", blur_radius, 0)
    clip_norm_percentile = _check_number("clip_norm_percentile", clip_norm_percentile, 0)
    for name, value in (("blur_every", blur_every), ("jitter", jitter), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if decay >= 1 or clip_norm_percentile > 100:
        raise ValueError("decay must be below 1 and clip_norm_percentile at most 100")
    if start not in ("zeros", "noise"):
        raise ValueError(f"start must be 'zeros' or 'noise', got {start!r}")
    engine = Saliency(net, score=score, input=input, batch_size=batch_size)
    ids = engine._classes(classes, 1)[0]  # a flat list of K classes, range-checked
    k, shape = len(ids), engine.image_shape
    rngs = [np.random.default_rng([seed, int(c)]) for c in ids]
    x = np.stack(
        [
            rng.standard_normal(shape).astype(np.float32) if start == "noise" else np.zeros(shape, np.float32)
            for rng in rngs
        ]
    )
    bounds = _valid_range(preprocessing, shape[0])
    per_row = ids.reshape(-1, 1)
    history = []
    out = np.empty((k, 1, *shape), np.float32)
    scores = np.empty((k, engine.num_classes), np.float32)
    for iteration in range(iterations):
        shifts = [tuple(rng.integers(-jitter, jitter + 1, 2)) if jitter else (0, 0) for rng in rngs]
        rolled = np.stack([np.roll(row, s, axis=(1, 2)) for row, s in zip(x, shifts)])
        for part in batch_slices(k, engine.batch_size):  # normally all K rows in one pass
            engine._engine.compute(rolled[part], per_row[part], out[part], reduce="none", scores=scores[part])
        history.append(scores[np.arange(k), ids].copy())
        gradient = np.stack([np.roll(g, (-s[0], -s[1]), axis=(1, 2)) for g, s in zip(out[:, 0], shifts)])
        x += np.float32(learning_rate) * gradient
        if decay:
            x *= np.float32(1 - decay)
        if blur_radius and blur_every and iteration % blur_every == 0:
            from scipy.ndimage import gaussian_filter

            x = gaussian_filter(x, sigma=(0, 0, blur_radius, blur_radius)).astype(np.float32)
        if clip_norm_percentile:
            norms = np.linalg.norm(x, axis=1)
            threshold = np.percentile(norms.reshape(k, -1), clip_norm_percentile, axis=1)
            x *= (norms >= threshold[:, None, None])[:, None]
        if bounds is not None:
            x = np.clip(x, bounds[0], bounds[1])
    if return_scores:
        final = engine._engine
        last = np.empty((k, engine.num_classes), np.float32)
        for part in batch_slices(k, engine.batch_size):
            final.scores(np.ascontiguousarray(x[part]), last[part])
        history.append(last[np.arange(k), ids])
        return x, np.array(history)
    return x


class _Dreamer:
    """The engines of one dream, one per image size (octave), sharing the net's weights."""

    def __init__(self, net, layer, input):  # noqa: A002
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a blob name (str), got {type(layer).__name__}")
        _core.check_blob(net, layer, "layer")  # the engine would call it a score blob
        self.net, self.layer, self.input, self.engines = net, layer, input, {}
        self.input_channels = self.engine(()).image_shape[0]  # the net's own size: checks the layer once

    def engine(self, shape) -> Saliency:
        """The engine for (C, H, W) images; () for the net's own input size. A dream layer rewritten in
        place (a ReLU on it) is the usual case: no warning."""
        if shape not in self.engines:
            self.engines[shape] = Saliency(
                self.net, score=self.layer, input=self.input, batch_size=1, _image_shape=shape, _warn=False
            )
        return self.engines[shape]

    def features(self, image: np.ndarray) -> np.ndarray:
        """The layer's values for one (C, H, W) image, as (channels, positions)."""
        engine = self.engine(tuple(image.shape))
        values = np.empty((1, engine.num_classes), np.float32)
        engine._engine.scores(np.ascontiguousarray(image[None], np.float32), values)
        return values.reshape(self.channels(engine), -1)

    @staticmethod
    def channels(engine: Saliency) -> int:
        blob_shape = engine._engine.score_shape
        return blob_shape[0] if blob_shape else 1

    def gradient(self, image: np.ndarray, guide: np.ndarray | None) -> np.ndarray:
        engine = self.engine(tuple(image.shape))
        out = np.empty((1, 1, *image.shape), np.float32)
        engine._engine.compute(
            np.ascontiguousarray(image[None], np.float32),
            np.zeros((1, 1), np.int32),
            out,
            reduce="none",
            objective="l2" if guide is None else "guide",
            guide=guide,
        )
        return out[0, 0]


def dream(
    net: caffe.Net,
    image,
    layer: str,
    *,
    octaves: int = 4,
    octave_scale: float = 1.4,
    iterations: int = 10,
    step_size: float = 1.5,
    jitter: int = 32,
    guide=None,
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
    input: str | None = None,  # noqa: A002
    return_norms: bool = False,
):
    """Deep dream of one (C, H, W) image in the net's input space, with Google's notebook's semantics.

    The objective is L2 at blob ``layer`` (its diff set to its data; any blob between the input and
    the net's end), or with ``guide`` (a (C, h, w) image) the notebook's guided objective: each position
    pulled toward the guide's feature at ``layer`` with the largest dot product. Octaves are made by
    zooming the image down by ``octave_scale`` (scipy's order-1 zoom), smallest first, the details carried
    up between octaves; each step rolls the image by a random shift of up to ``jitter`` pixels, adds
    ``step_size / mean|g| * g``, rolls back, and (with ``preprocessing``) clips to the valid pixel range.
    Any image size works: each octave gets its own internal net, sharing the weights. Returns the
    dreamt (C, H, W) image; ``preprocessing.deprocess`` makes it displayable. With ``return_norms``,
    also the L2 norm of the layer's values at each octave, [(before, after), ...], smallest first.
    """
    from scipy import ndimage

    _check_net(net)
    _check_positive_int("octaves", octaves)
    _check_positive_int("iterations", iterations)
    octave_scale = _check_number("octave_scale", octave_scale, 1, strict=True)
    step_size = _check_number("step_size", step_size, 0)
    if isinstance(jitter, bool) or not isinstance(jitter, numbers.Integral) or jitter < 0:
        raise ValueError(f"jitter must be an integer >= 0, got {jitter!r}")
    dreamer = _Dreamer(net, layer, input)
    channels = dreamer.input_channels
    base = _checked_image(image, channels, "image")
    guide_features = None
    if guide is not None:
        guide_features = np.ascontiguousarray(dreamer.features(_checked_image(guide, channels, "guide")))
    bounds = _valid_range(preprocessing, channels)
    if bounds is not None and preprocessing.mean is not None and preprocessing.mean.ndim == 3:
        raise ValueError("dream clips with a per-channel mean only: give preprocessing a (C,) mean")
    pyramid = [base]
    for _ in range(octaves - 1):
        pyramid.append(ndimage.zoom(pyramid[-1], (1, 1 / octave_scale, 1 / octave_scale), order=1))
    rng = np.random.default_rng(seed)
    detail = np.zeros_like(pyramid[-1])
    x = pyramid[-1]
    norms = []
    for octave_base in pyramid[::-1]:
        h, w = octave_base.shape[-2:]
        if detail.shape[-2:] != (h, w):
            detail = ndimage.zoom(detail, (1, h / detail.shape[1], w / detail.shape[2]), order=1)
        x = (octave_base + detail).astype(np.float32)
        before = float(np.linalg.norm(dreamer.features(x))) if return_norms else None
        for _ in range(iterations):
            oy, ox = rng.integers(-jitter, jitter + 1, 2) if jitter else (0, 0)
            rolled = np.roll(x, (oy, ox), axis=(1, 2))
            g = dreamer.gradient(rolled, guide_features)
            scale = float(np.abs(g).mean())
            rolled = rolled + np.float32(step_size / scale if scale > 0 else 0.0) * g
            x = np.roll(rolled, (-oy, -ox), axis=(1, 2))
            if bounds is not None:
                x = np.clip(x, bounds[0][:, :1, :1], bounds[1][:, :1, :1])
        detail = x - octave_base
        if return_norms:
            norms.append((before, float(np.linalg.norm(dreamer.features(x)))))
    return (x, norms) if return_norms else x


def _checked_image(image, channels: int, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[0] != channels:
        raise ValueError(
            f"{name} must be one ({channels}, H, W) image in the net's input space, got shape {array.shape}"
        )
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf once converted to float32")
    return array
