"""The perturbation methods: occlusion, RISE, Score-CAM and Ablation-CAM. No gradients: each builds
perturbed copies of an image (or of a layer's activations) batch by batch and reads their class scores
through the forward-only path; one forward serves every class of an image, so K classes cost what one
does."""

from __future__ import annotations

import math

import numpy as np
from skimage.transform import resize

from ._forward import Forward, softmax
from ._resample import upsample

# pytorch-grad-cam's AblationLayer: an ablated channel goes to 0 where the activations' minimum is 0
# (after a ReLU), else this far below that minimum.
ABLATION_VALUE = 1e7
DEFAULT_WINDOW, DEFAULT_STRIDE = 15, 8  # occlusion: 15 x 15 windows every 8 pixels


def _pick(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """scores (R, num_classes), classes (R, K) -> (R, K): each row's scores of its own classes."""
    return np.take_along_axis(scores, classes, axis=1)


def _per_axis(value, name: str, dims: int) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != dims or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {dims} positive ints, got {value!r}")
    return tuple(int(v) for v in values)


def occlusion_windows(image_shape, sliding_window_shapes, strides):
    """Captum's windows: along each axis, starts 0, s, 2s, ... up to the last that fits, one more where
    the stride does not reach the end (ceil((size - window) / stride) + 1 starts; a last window past
    the edge is cut there). Returns (window (c, h, w), the list of (c, y, x) starts)."""
    dims = len(image_shape)
    if sliding_window_shapes is None:  # Captum's tutorials' ImageNet setting, cut to a smaller image
        sliding_window_shapes = tuple(min(DEFAULT_WINDOW, size) for size in image_shape[1:])
    if strides is None:
        strides = tuple(min(DEFAULT_STRIDE, w) for w in sliding_window_shapes[-(dims - 1) :])
    window = _per_axis(sliding_window_shapes, "sliding_window_shapes", len(sliding_window_shapes))
    every_channel = len(window) == dims - 1  # (h, w): every channel at once, the usual image occlusion
    if every_channel:
        window = (image_shape[0], *window)
    if len(window) != dims or any(w > size for w, size in zip(window, image_shape)):
        raise ValueError(
            f"sliding_window_shapes must be (h, w) or (c, h, w) within the image's {tuple(image_shape)}, "
            f"got {sliding_window_shapes!r}"
        )
    single = isinstance(strides, (int, np.integer)) and not isinstance(strides, bool)
    stride = _per_axis(strides, "strides", dims if single or not every_channel else dims - 1)
    if every_channel:  # the channel axis has one window: its stride is moot
        stride = (window[0], *stride[-(dims - 1) :])
    if any(s > w for s, w in zip(stride, window)):
        raise ValueError(f"strides {stride} must not exceed the window {window}: pixels would be skipped")
    starts = [
        [i * s for i in range(math.ceil((size - w) / s) + 1)]
        for size, w, s in zip(image_shape, window, stride)
    ]
    grid = [(c, y, x) for x in starts[2] for y in starts[1] for c in starts[0]]
    return window, grid


def occlusion(forward: Forward, images, classes, clean, baselines, options) -> np.ndarray:
    """Captum's Occlusion: each window set to the baseline in turn; an element's attribution is the
    mean, over the windows covering it, of f(x) - f(x with the window occluded). Returns the raw
    (N, K, C, H, W) attributions."""
    n, k = classes.shape
    shape = images.shape[1:]
    window, grid = occlusion_windows(shape, options["sliding_window_shapes"], options["strides"])
    per_image = len(grid)
    channel_windows = window[0] < shape[0]  # else every channel shares each window's value
    out = np.zeros((n, k, shape[0] if channel_windows else 1, *shape[1:]), np.float32)
    covered = np.zeros(shape, np.float32)
    for c, y, x in grid:
        covered[c : c + window[0], y : y + window[1], x : x + window[2]] += 1
    clean_picked = _pick(clean, classes)

    def window_of(row: int):
        c, y, x = grid[row % per_image]
        return np.s_[c : c + window[0], y : y + window[1], x : x + window[2]]

    def rows(start, stop):
        batch = np.empty((stop - start, *shape), np.float32)
        for i, row in enumerate(range(start, stop)):
            image = row // per_image
            batch[i] = images[image]
            part = window_of(row)
            baseline = baselines[image] if baselines.ndim == 4 else np.broadcast_to(baselines, shape)
            batch[i][part] = baseline[part]
        return batch

    def consume(start, stop, scores):
        owners = np.arange(start, stop) // per_image
        drops = clean_picked[owners] - _pick(scores, classes[owners])
        for i, row in enumerate(range(start, stop)):
            c, y, x = grid[row % per_image]
            channels = np.s_[c : c + window[0]] if channel_windows else np.s_[:]
            out[owners[i], :, channels, y : y + window[1], x : x + window[2]] += drops[i][:, None, None, None]

    forward.stream(n * per_image, rows, consume)
    return np.broadcast_to(out / (covered if channel_windows else covered[:1]), (n, k, *shape))


def rise_masks(first: int, count: int, size: tuple[int, int], grid_size: int, p1: float, seed: int):
    """RISE's masks first .. first+count-1 (Petsiuk et al. 2018, their generate_masks): a grid_size x
    grid_size grid of cells kept with probability p1, upsampled bilinearly to (grid_size + 1) cells of
    ceil(size / grid_size) pixels, shifted by a random offset within one cell and cut to size. Mask i
    comes from numpy.random.default_rng([seed, i]), so any range of masks is the same set."""
    cell = np.ceil(np.array(size) / grid_size).astype(int)
    up = (grid_size + 1) * cell
    masks = np.empty((count, *size), np.float32)
    for i in range(count):
        rng = np.random.default_rng([seed, first + i])
        grid = (rng.random((grid_size, grid_size)) < p1).astype(np.float64)
        dy, dx = rng.integers(0, cell[0]), rng.integers(0, cell[1])
        smooth = resize(grid, up, order=1, mode="reflect", anti_aliasing=False)
        masks[i] = smooth[dy : dy + size[0], dx : dx + size[1]]
    return masks


def rise(forward: Forward, images, classes, options) -> np.ndarray:
    """RISE: sum_i p_c(M_i * x) M_i / (n_masks p1), p_c the class probability (the softmax of the scores,
    or the scores themselves with probabilities=False). Returns (N, K, H, W)."""
    n, k = classes.shape
    size = images.shape[2:]
    count = options["n_masks"]
    out = np.zeros((n, k, *size), np.float64)
    cache = {}

    def masks_of(
        start, stop
    ):  # each batch's masks (row r is mask r % count), drawn once for rows and consume
        if (start, stop) not in cache:
            cache.clear()
            index = np.arange(start, stop) % count
            unique = np.unique(index)  # a batch may wrap around the masks, even several times
            grid, p1, seed = options["grid_size"], options["p1"], options["seed"]
            drawn = np.concatenate([rise_masks(int(i), 1, size, grid, p1, seed) for i in unique])
            cache[(start, stop)] = drawn[np.searchsorted(unique, index)]
        return cache[(start, stop)]

    def rows(start, stop):
        owners = np.arange(start, stop) // count
        return images[owners] * masks_of(start, stop)[:, None]

    def consume(start, stop, scores):
        owners = np.arange(start, stop) // count
        values = softmax(scores) if options["probabilities"] else scores
        picked = _pick(values, classes[owners]).astype(np.float64)
        masks = masks_of(start, stop).reshape(stop - start, -1).astype(np.float64)
        for image in np.unique(owners):
            mine = owners == image
            out[image] += (picked[mine].T @ masks[mine]).reshape(k, *size)

    forward.stream(n * count, rows, consume)
    return (out / (count * options["p1"])).astype(np.float32)


def _minmax(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image per map: (m - min) / (max - min + 1e-7)."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    shifted = maps - low
    return shifted / (1e-7 + shifted.max(axis=(-2, -1), keepdims=True))


def _cam(weights: np.ndarray, activations: np.ndarray, size, options) -> np.ndarray:
    """The CAM family's map from per-channel weights (N, K, C) and activations (N, C, h, w): ReLU of the
    weighted sum, upsampled bilinearly to the input, then (normalize) scaled to [0, 1] per map."""
    cams = np.maximum(np.einsum("nkc,nchw->nkhw", weights, activations), 0)
    if options["upsample"]:
        cams = upsample(cams, size, options["upsample"])
    return (_minmax(cams) if options["normalize"] else cams).astype(np.float32)


def scorecam(forward: Forward, images, classes, options) -> np.ndarray:
    """Score-CAM (Wang et al. 2020) with pytorch-grad-cam's semantics: each channel of the layer,
    upsampled to the input (bilinear, align_corners=True) and scaled to [0, 1], masks the image; the
    softmax over channels of the masked images' class scores weighs the channels. Channels with the same
    values (all-zero ones after a ReLU) make the same masked image: one forward serves them all."""
    n, k = classes.shape
    activations, _ = forward.activations(images)
    channels = activations.shape[1]
    size = images.shape[2:]
    # Per image, its distinct channels (bit for bit) and, per channel, which of them it equals.
    distinct, same_as = [np.empty(0, np.int64)], np.empty((n, channels), np.int64)
    bits = activations.reshape(n, channels, math.prod(activations.shape[2:])).view(np.uint32)
    for image, values in enumerate(bits):
        _, first, inverse = np.unique(values, axis=0, return_index=True, return_inverse=True)
        distinct.append(first)
        same_as[image] = first[inverse.reshape(-1)]
    owners = np.repeat(np.arange(n), [len(d) for d in distinct[1:]])
    channel_of = np.concatenate(distinct)
    scores = np.empty((n, channels, k), np.float32)

    def rows(start, stop):
        owner, channel = owners[start:stop], channel_of[start:stop]
        masks = upsample(activations[owner, channel], size, "bilinear_corners")
        low = masks.min(axis=(1, 2), keepdims=True)
        masks = (masks - low) / (masks.max(axis=(1, 2), keepdims=True) - low + 1e-8)
        return images[owner] * masks[:, None]

    def consume(start, stop, batch_scores):
        owner = owners[start:stop]
        scores[owner, channel_of[start:stop]] = _pick(batch_scores, classes[owner])

    forward.stream(len(owners), rows, consume)
    scores = scores[np.arange(n)[:, None], same_as]  # each channel takes its twin's scores
    return _cam(softmax(scores.transpose(0, 2, 1)), activations, size, options)


def ablationcam(forward: Forward, images, classes, options) -> np.ndarray:
    """Ablation-CAM (Desai and Ramaswamy 2020) with pytorch-grad-cam's semantics: each channel of the
    layer ablated in turn (set to 0 after a ReLU, else to the activations' minimum minus 1e7); channel
    c's weight is (y - y_c) / y, y the class score. The ablated forwards start at the layer: the layers
    below it run once per image."""
    n, k = classes.shape
    activations, clean = forward.activations(images)
    channels = activations.shape[1]
    floor = activations.min(axis=(1, 2, 3), initial=np.inf)
    fill = np.where(floor == 0, 0, floor - ABLATION_VALUE).astype(np.float32)
    scores = np.empty((n, channels, k), np.float32)

    def rows(start, stop):
        owners, channel = np.divmod(np.arange(start, stop), channels)
        batch = activations[owners].copy()
        batch[np.arange(stop - start), channel] = fill[owners, None, None]
        return batch

    def consume(start, stop, batch_scores):
        owners, channel = np.divmod(np.arange(start, stop), channels)
        scores[owners, channel] = _pick(batch_scores, classes[owners])

    original = _pick(clean, classes)[:, None, :]
    if (original == 0).any():  # the weights (y - y_c) / y are undefined; refused before any work
        image, _, k = np.argwhere(original == 0)[0]
        raise ValueError(
            f"images[{image}] scores exactly 0 for class {classes[image, k]}: Ablation-CAM's weights "
            "(y - y_c) / y are undefined there"
        )
    forward.stream(n * channels, rows, consume, from_layer=True)
    weights = ((original - scores) / original).transpose(0, 2, 1)
    return _cam(weights, activations, images.shape[2:], options)
