"""Images optimised by gradient ascent on the input, on fastsal's internal net (weight gradients off):
class-model visualisation (Simonyan et al. 2013, Yosinski et al. 2015), K classes as K rows of one
batch, and deep dream (Google's 2015 notebook), octave by octave at any image size."""

from __future__ import annotations

import numbers

import caffe
import numpy as np

from . import _core, _imageparam
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
PARAMETERIZATIONS = ("fourier", "pixel")
# Lucid's standard_transforms (pad 12 with grey, jitter 8, scale 0.9-1.1, rotate -10..10 degrees with 0
# five times as likely, jitter 4), made one affine map at the net's own input size; the shift is 12
# pixels at Lucid's 224 and in proportion at other sizes.
TRANSFORMS = {
    "translate": 12 / 224,
    "scales": [1 + (i - 5) / 50 for i in range(11)],
    "angles": list(range(-10, 11)) + 5 * [0],
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
    parameterization: str = "fourier",
    transforms: bool = True,
    learning_rate: float | None = None,
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
    its own class; the image is then updated in one of two ways.

    ``parameterization="fourier"`` (the default; Lucid's, Olah et al. 2017): each image is a spectrum,
    scaled by 1/frequency and inverse-FFT'd, in decorrelated colour (Lucid's ImageNet colour matrix),
    squashed by a sigmoid into [0, 1] pixels and given to the net through ``preprocessing`` (default:
    ``Preprocessing(input shape)``, i.e. raw_scale 255, RGB to BGR, no mean); with ``transforms`` the
    net sees each step's image randomly scaled (0.9-1.1), rotated (up to 10 degrees) and shifted (up to
    12 pixels) with grey outside, as Lucid's standard transformations do. The engine's input gradient
    goes back through those maps by the chain rule, and Adam (``learning_rate`` 0.05 by default) ascends
    the spectrum. Nets of 1 or 3 channels.

    ``parameterization="pixel"`` (Simonyan et al. 2013, Yosinski et al. 2015): gradient ascent on the
    pixels, x += learning_rate (default 1.0) * gradient (after undoing a random roll of up to ``jitter``
    pixels), x *= 1 - decay (L2 decay), a Gaussian blur of ``blur_radius`` every ``blur_every``
    iterations, pixels whose norm over channels is below the ``clip_norm_percentile``-th percentile set
    to 0, and, with ``preprocessing``, clipping to the pixels' valid range. ``preset="simonyan"`` or
    ``"yosinski"`` selects it with the papers' values (explicit arguments do not override a preset).
    Those regularisers belong to the pixel parameterisation only.

    ``start``: ``"noise"`` (seeded: N(0, 1) pixels, or Lucid's N(0, 0.01) spectrum; the default: from a
    zero image a ReLU net's gradient can vanish) or ``"zeros"`` (Simonyan's; a grey image in Fourier).
    Each row's randomness comes from ``default_rng([seed, class])``, so a batch of classes equals the
    classes one at a time. Cost per iteration: one forward and one backward of K rows. With
    ``return_scores``, also the (iterations + 1, K) target scores along the way (of the image the net
    saw at each step; the last of the returned images, untransformed).
    """
    _check_net(net)
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be 'fourier' or 'pixel', got {parameterization!r}")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        parameterization = "pixel"
        learning_rate, decay, blur_radius, blur_every, jitter = (
            PRESETS[preset][k] for k in ("learning_rate", "decay", "blur_radius", "blur_every", "jitter")
        )
    fourier = parameterization == "fourier"
    _check_positive_int("iterations", iterations)
    if learning_rate is None:
        learning_rate = 0.05 if fourier else 1.0
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
    pixel_only = {"decay": decay, "blur_radius": blur_radius, "blur_every": blur_every, "jitter": jitter}
    pixel_only["clip_norm_percentile"] = clip_norm_percentile
    if fourier and any(pixel_only.values()):
        used = ", ".join(name for name, value in pixel_only.items() if value)
        raise ValueError(f"{used} apply to parameterization='pixel' (or a preset) only")
    if not isinstance(transforms, bool):
        raise TypeError(f"transforms must be True or False, got {transforms!r}")
    engine = Saliency(net, score=score, input=input, batch_size=batch_size)
    ids = engine._classes(classes, 1)[0]  # a flat list of K classes, range-checked
    rngs = [np.random.default_rng([seed, int(c)]) for c in ids]
    if fourier:
        images, history = _fourier_ascent(
            engine, ids, rngs, iterations, learning_rate, transforms, start, preprocessing
        )
    else:
        images, history = _pixel_ascent(
            engine,
            ids,
            rngs,
            iterations,
            learning_rate,
            decay,
            blur_radius,
            blur_every,
            jitter,
            clip_norm_percentile,
            start,
            preprocessing,
        )
    if return_scores:
        last = engine._scores(images)
        history.append(last[np.arange(len(ids)), ids])
        return images, np.array(history)
    return images


def _gradients(engine: Saliency, images: np.ndarray, ids: np.ndarray, history: list) -> np.ndarray:
    """d score(class of row k) / d row k's input, for every row; the scores appended to ``history``."""
    k = len(ids)
    out = np.empty((k, 1, *images.shape[1:]), np.float32)
    scores = np.empty((k, engine.num_classes), np.float32)
    per_row = ids.reshape(-1, 1)
    images = np.ascontiguousarray(images, np.float32)
    for part in batch_slices(k, engine.batch_size):  # normally all K rows in one pass
        engine._engine.compute(images[part], per_row[part], out[part], reduce="none", scores=scores[part])
    history.append(scores[np.arange(k), ids].copy())
    return out[:, 0]


def _pixel_ascent(
    engine,
    ids,
    rngs,
    iterations,
    learning_rate,
    decay,
    blur_radius,
    blur_every,
    jitter,
    clip,
    start,
    preprocessing,
):
    """Simonyan's and Yosinski's ascent on the pixels, their regularisers after each step."""
    k, shape = len(ids), engine.image_shape
    x = np.stack(
        [
            rng.standard_normal(shape).astype(np.float32) if start == "noise" else np.zeros(shape, np.float32)
            for rng in rngs
        ]
    )
    bounds = _valid_range(preprocessing, shape[0])
    history = []
    for iteration in range(iterations):
        shifts = [tuple(rng.integers(-jitter, jitter + 1, 2)) if jitter else (0, 0) for rng in rngs]
        rolled = np.stack([np.roll(row, s, axis=(1, 2)) for row, s in zip(x, shifts)])
        out = _gradients(engine, rolled, ids, history)
        gradient = np.stack([np.roll(g, (-s[0], -s[1]), axis=(1, 2)) for g, s in zip(out, shifts)])
        x += np.float32(learning_rate) * gradient
        if decay:
            x *= np.float32(1 - decay)
        if blur_radius and blur_every and iteration % blur_every == 0:
            from scipy.ndimage import gaussian_filter

            x = gaussian_filter(x, sigma=(0, 0, blur_radius, blur_radius)).astype(np.float32)
        if clip:
            norms = np.linalg.norm(x, axis=1)
            threshold = np.percentile(norms.reshape(k, -1), clip, axis=1)
            x *= (norms >= threshold[:, None, None])[:, None]
        if bounds is not None:
            x = np.clip(x, bounds[0], bounds[1])
    return x, history


def _fourier_ascent(engine, ids, rngs, iterations, learning_rate, transforms, start, preprocessing):
    """Lucid's parameterisation (:class:`_FourierImages`) ascended by Adam, each row its own warps."""
    images = _FourierImages(engine.image_shape, preprocessing)
    size = images.spectrum.parameter_shape((engine.image_shape[0],))
    parameters = np.stack(
        [rng.standard_normal(size) * 0.01 if start == "noise" else np.zeros(size) for rng in rngs]
    )
    adam = _imageparam.Adam(parameters.shape, learning_rate)
    history = []
    _, height, width = engine.image_shape
    for _ in range(iterations):
        warps = [
            _imageparam.random_affine(rng, height, width, **TRANSFORMS) if transforms else None
            for rng in rngs
        ]
        rgb, inputs = images.forward(parameters, warps)
        adam.step(parameters, images.backward(rgb, warps, _gradients(engine, inputs, ids, history)))
    return images.forward(parameters, [None] * len(ids))[1], history


class _FourierImages:
    """Spectrum -> 1/f image -> decorrelated colour (3 channels) -> sigmoid -> RGB pixels in [0, 1] ->
    a random affine map per row (or None) -> ``preprocessing`` -> the net's inputs, and back."""

    def __init__(self, image_shape, preprocessing: Preprocessing | None):
        channels, height, width = image_shape
        if channels not in (1, 3):
            raise ValueError(
                f"parameterization='fourier' makes pictures, for nets of 1 or 3 channels; this net takes "
                f"{channels}: use parameterization='pixel'"
            )
        if preprocessing is None:
            # classify.py's defaults
            preprocessing = Preprocessing(
                (channels, height, width), channel_swap=(2, 1, 0) if channels == 3 else None
            )
        elif tuple(preprocessing.input_shape) != (channels, height, width):
            raise ValueError(
                f"preprocessing is for input shape {tuple(preprocessing.input_shape)}, the net takes "
                f"{(channels, height, width)}"
            )
        self.preprocessing, self.colour = preprocessing, channels == 3
        self.spectrum = _imageparam.Spectrum(height, width)

    def pixels(self, parameters: np.ndarray) -> np.ndarray:
        image = self.spectrum.forward(parameters)
        return _imageparam.sigmoid(_imageparam.decorrelate(image) if self.colour else image)

    def forward(self, parameters: np.ndarray, warps) -> tuple[np.ndarray, np.ndarray]:
        """(the RGB pixels, the net's inputs after each row's warp)."""
        rgb = self.pixels(parameters)
        seen = np.stack(
            [p if w is None else _imageparam.apply_affine(w, p - 0.5) + 0.5 for p, w in zip(rgb, warps)]
        )
        return rgb, _to_input(self.preprocessing, seen)

    def backward(self, rgb: np.ndarray, warps, input_gradient: np.ndarray) -> np.ndarray:
        """The gradient wrt the parameters from the one wrt the net's inputs (each map's adjoint)."""
        gradient = _input_adjoint(self.preprocessing, input_gradient)
        gradient = np.stack(
            [
                g if w is None else _imageparam.apply_affine(w, g, transpose=True)
                for g, w in zip(gradient, warps)
            ]
        )
        gradient = gradient * rgb * (1 - rgb)  # the sigmoid's derivative
        if self.colour:
            gradient = _imageparam.decorrelate_adjoint(gradient)
        return self.spectrum.adjoint(gradient)


def _to_input(preprocessing: Preprocessing, rgb: np.ndarray) -> np.ndarray:
    """(K, C, H, W) pixels in [0, 1], RGB order, as the net's inputs."""
    return np.stack([preprocessing.transform(image.transpose(1, 2, 0)) for image in rgb])


def _input_adjoint(preprocessing: Preprocessing, gradient: np.ndarray) -> np.ndarray:
    """A gradient wrt the net's inputs as one wrt the (K, C, H, W) RGB pixels: the preprocessing is a
    channel permutation times one gain, plus a constant."""
    gain = (preprocessing.raw_scale or 1.0) * (preprocessing.input_scale or 1.0)
    order = list(preprocessing.channel_swap) if preprocessing.channel_swap is not None else slice(None)
    out = np.empty(gradient.shape, np.float64)
    out[:, order] = gradient * gain
    return out


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
