"""Saliency maps of a caffe.Net: argument checks, streaming in batches, and the per-net engine cache."""

from __future__ import annotations

import numbers
import threading
import warnings
import weakref
from collections.abc import Sequence

import caffe
import numpy as np

from . import _core
from ._build import user_stacklevel, warn_if_blas_is_slow
from ._threads import check_threads, default_threads

DEFAULT_MEMORY_BUDGET = 1 << 30


def batch_slices(n: int, cap: int) -> list[slice]:
    """range(n) in passes of at most cap, as the engine cuts its own (``_core.balanced_rows``): as few
    passes as cap allows, none needlessly short (8 at cap 7: 4 + 4, not 7 + 1)."""
    step = _core.balanced_rows(n, cap)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


class Saliency:
    """Saliency maps (Simonyan et al. 2013) of one ``caffe.Net``, reusable across calls.

    Builds fastsal's internal net once: the layers between ``input`` and ``score``, with
    force_backward on and weight gradients off, sharing the weights of ``net`` (no copy). ``net``
    itself is never modified, and later changes to its weights are seen here. While ``net`` is alive,
    each call checks that it still fits: after ``net.reshape()`` to another image size or
    ``net.share_with(other)``, the internal net is rebuilt for the net as it now is.

    Args:
        net: a pycaffe ``caffe.Net``, typically a deploy net in TEST phase.
        score: the blob whose entries are the class scores. Default: the input of the net's one
            Softmax output (the pre-softmax scores, as Simonyan et al. use), else the net's only
            output; with several Softmax outputs, name it. The score is the blob as pycaffe shows it
            after a forward pass, in-place layers after its producer included (a UserWarning names
            them: an in-place ReLU zeroes the gradient of every negative score), except a Softmax
            applied in place, which is never part of the score.
        input: the blob to differentiate with respect to, produced by an Input layer.
            Default: the net's first input.
        batch_size: images per forward pass. Default: as many as fit ``memory_budget`` bytes of
            blobs, at most 16. Memory stays bounded by it however many images a call gets.
        fast_layers: run fastsal's faster CPU code: Caffe's forward arithmetic spread over the
            cores (its GEMMs included, bit for bit), the convolutions' backward through oneDNN with
            BatchNorm and Scale folded into their weights, and one backward for all classes through
            a head of fully connected layers. False runs Caffe's own layer code throughout (slower;
            the maps agree to float rounding).
        exact: True (default): the forward pass is Caffe's own arithmetic, so the maps agree with
            the seed recipe's to float rounding. False (with ``fast_layers``, on the CPU): the
            convolutions' forward runs through oneDNN too, BatchNorm and Scale folded in, faster,
            most of all at one class per image. Its activations round differently, and where an
            activation sits within rounding of a ReLU's kink or a max-pooling tie the gradient takes
            another path: the maps agree with exact ones in rank (Spearman >= 0.99 on open_nsfw and
            VGG-16, tested), not to rounding. On a CPU with AMX (``build_info()["inexact_backward"]``)
            the convolutions' backward also runs in bfloat16, 2-4x faster, within 1e-2 of the map's
            maximum. No effect on a GPU.
        device: None for the CPU, or the CUDA device to run on (needs a CUDA build: see
            :func:`fastsal.has_cuda`). Only the maps are copied back from the device.
        batch_layout: ``"auto"`` (default), ``"per_class"`` (one forward per batch of images, one
            backward per class) or ``"pairs"`` (each image repeated K times in the batch, one genuine
            forward and one backward: better on a GPU that the images alone leave under-filled).
        memory_budget: bytes of activations and gradients the internal net may use when
            ``batch_size`` is not given.
        threads: CPU threads for this engine's work (fastsal's layers, oneDNN's, Caffe's products).
            Default: ``FASTSAL_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the CPUs this process may
            use (its affinity and cgroup quota, not the machine's core count). Exact maps do not
            depend on it.
    """

    def __init__(
        self,
        net: caffe.Net,
        *,
        score: str | None = None,
        input: str | None = None,  # noqa: A002 - the user's word for it
        batch_size: int | None = None,
        fast_layers: bool = True,
        exact: bool = True,
        device: int | None = None,
        batch_layout: str = "auto",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        threads: int | None = None,
        _gradient_blob: str = "",
        _relu_rule: str = "gradient",
        _layer_rules: tuple = (),
        _deeplift: bool = False,
        _image_shape: tuple[int, ...] = (),
        _warn: bool = True,
        _bf16_backward: bool = True,
        _bf16_forward: bool = False,
        _blocked_layouts: bool = True,
        _forward_only: bool = False,
    ):
        _check_net(net)
        for name, value in (("score", score), ("input", input)):
            _check_blob_name(name, value)
        if batch_size is not None:
            _check_positive_int("batch_size", batch_size)
        if device is not None and (
            isinstance(device, bool) or not isinstance(device, numbers.Integral) or device < 0
        ):
            raise ValueError(f"device must be None (the CPU) or a CUDA device index >= 0, got {device!r}")
        _check_positive_int("memory_budget", memory_budget)
        if threads is not None:
            check_threads(threads)
        if not exact and not fast_layers:
            raise ValueError(
                "exact=False needs fast_layers=True: the inexact forward is one of fastsal's layers"
            )
        self._options = dict(
            input_blob=input or "",
            score_blob=score or "",
            gradient_blob=_gradient_blob,
            relu_rule=_relu_rule,
            image_shape=list(_image_shape),
            batch_size=batch_size or 0,
            fast_layers=bool(fast_layers),
            exact=bool(exact),
            bf16_backward=bool(_bf16_backward),
            bf16_forward=bool(_bf16_forward),
            blocked_layouts=bool(_blocked_layouts),
            device=-1 if device is None else int(device),
            layout=batch_layout,
            memory_budget=memory_budget,
            threads=threads or default_threads(),
            forward_only=bool(_forward_only),
            layer_rules=list(_layer_rules),
            deeplift=bool(_deeplift),
        )
        if device is None and self._options["exact"]:
            warn_if_blas_is_slow()  # the exact CPU forward is Caffe's OpenBLAS arithmetic
        self._net = weakref.ref(net)
        self._warn = _warn
        self._lock = threading.Lock()
        self._engine = self._build(net)

    def _build(self, net):
        engine = _core.Engine(net, **self._options)
        if engine.score_rewrites and self._warn:
            warnings.warn(
                f"score blob '{engine.score_blob}' is rewritten in place by "
                + ", ".join(engine.score_rewrites)
                + " after the layer that computes it; the maps are gradients of its value after them, as "
                "net.blobs shows it (an in-place ReLU zeroes the gradient of every negative score)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return engine

    def _refresh(self) -> None:
        """Rebuilds the engine if the user's net changed under it (new image size, share_with)."""
        net = self._net()
        with self._lock:
            if net is not None and not self._engine.matches(net):
                self._engine = self._build(net)

    def reload_weights(self) -> None:
        """Call after writing ``net``'s weights in place: what the engine built from them is rebuilt
        (LRP's modified weights; the folded and reordered convolution weights are rebuilt at every pass
        anyway), so the next maps are those of a new engine on the net as it now is."""
        self._refresh()
        self._engine.reload_weights()

    @property
    def input(self) -> str:
        """The blob the maps are gradients with respect to."""
        return self._engine.input_blob

    @property
    def score(self) -> str:
        """The blob of class scores being differentiated."""
        return self._engine.score_blob

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one input image."""
        return tuple(self._engine.image_shape)

    @property
    def num_classes(self) -> int:
        """Number of class scores per image in the score blob."""
        return self._engine.num_classes

    @property
    def batch_size(self) -> int:
        """Images per internal forward pass (with pairs: (image, class) pairs)."""
        return self._engine.batch_size

    @property
    def bytes_per_image(self) -> int:
        """Memory the internal net keeps per image of a batch: activations, gradients, layer state."""
        return self._engine.bytes_per_image

    @property
    def threads(self) -> int:
        """CPU threads this engine's calls use."""
        return self._engine.threads

    @property
    def device(self) -> int | None:
        """The CUDA device the engine runs on, or None for the CPU."""
        return None if self._engine.device < 0 else self._engine.device

    def compute(self, images, classes, *, gradients: bool = False) -> np.ndarray:
        """Saliency maps of ``images`` for ``classes``.

        Args:
            images: preprocessed images, (N, C, H, W) or one (C, H, W) image, of any real dtype and
                memory order; (C, H, W) must match the net's input blob.
            classes: which class scores to differentiate, in one of three forms:

                - an int: the same class for every image (K = 1);
                - a sequence of K ints: the same K classes for every image;
                - an (N, K) integer array: K classes per image, row n for image n.
            gradients: return the raw gradients, (N, K, C, H, W), instead of the maps.

        Images holding NaN or Inf once converted to float32 raise ValueError, and so do images whose
        activations overflow float32 inside the net (Inf or NaN reaching a max pooling or the scores):
        their gradients are undefined.

        Returns:
            float32 maps (N, K, H, W) with ``maps[n, k] = max_c |d score[classes[n, k]] / d images[n, c]|``;
            for a single (C, H, W) image, (K, H, W).
        """
        self._refresh()
        batch, single = self._images(images)
        class_ids = self._classes(classes, len(batch))
        result, _ = self._run(batch, class_ids, class_ids.shape[1], gradients)
        return result[0] if single else result

    def compute_top_k(self, images, k: int = 1, *, gradients: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Saliency maps for each image's ``k`` highest-scoring classes.

        Returns ``(maps, classes)``: maps as in :meth:`compute` and the (N, k) int64 class ids, best
        first (ties: lower id first); for a single (C, H, W) image, (k, H, W) and (k,).
        """
        _check_positive_int("k", k)
        self._refresh()
        if k > self.num_classes:
            raise ValueError(f"k={k} exceeds the {self.num_classes} classes of score blob '{self.score}'")
        batch, single = self._images(images)
        result, top = self._run(batch, None, k, gradients)
        return (result[0], top[0]) if single else (result, top)

    def _run(self, images: np.ndarray, classes: np.ndarray | None, k: int, gradients: bool):
        n = len(images)
        shape = self.image_shape if gradients else self.image_shape[1:]
        out = np.empty((n, k, *shape), np.float32)
        top = np.empty((n, k), np.int32) if classes is None else None
        for part in batch_slices(n, self.batch_size):
            start = part.start
            # Converted one batch at a time, so a float64 or strided input is never copied whole.
            self._engine.compute(
                np.ascontiguousarray(images[part], dtype=np.float32),
                None if classes is None else classes[part],
                out[part],
                reduce="none" if gradients else "absmax",
                top_classes=None if top is None else top[part],
                first_index=start,
            )
        return out, None if top is None else top.astype(np.int64)

    def _scores(self, images: np.ndarray) -> np.ndarray:
        """The score blob's values of (N, C, H, W) images, (N, num_classes): forward passes only, a batch
        at a time (each converted to float32 only then)."""
        out = np.empty((len(images), self.num_classes), np.float32)
        for part in batch_slices(len(images), self.batch_size):
            self._engine.scores(np.ascontiguousarray(images[part], np.float32), out[part], part.start)
        return out

    def profile_layers(self, images, classes) -> list[tuple[str, str, float, float]]:
        """(layer, type, forward seconds, backward seconds) of Caffe's own layer calls for the work of
        ``compute(images, classes)``. With ``fast_layers=False`` this is Caffe's own layer time: the
        floor the benchmarks compare fastsal with."""
        self._refresh()
        batch, _ = self._images(images)
        class_ids = self._classes(classes, len(batch))
        h, w = self.image_shape[1:]
        maps = np.empty((len(batch), class_ids.shape[1], h, w), np.float32)
        return self._engine.profile_layers(np.ascontiguousarray(batch, dtype=np.float32), class_ids, maps)

    def _images(self, images) -> tuple[np.ndarray, bool]:
        if not isinstance(images, np.ndarray):
            images = np.asarray(images)
        if (
            images.dtype == np.bool_
            or not np.issubdtype(images.dtype, np.number)
            or np.issubdtype(images.dtype, np.complexfloating)
        ):
            raise TypeError(f"images must hold real numbers, got dtype {images.dtype}")
        single = images.ndim == 3
        if single:
            images = images[np.newaxis]
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) or one (C, H, W) image, got shape {images.shape}")
        if images.shape[1:] != self.image_shape:
            raise ValueError(
                f"images have shape {images.shape[1:]} per image, but input blob '{self.input}' takes "
                f"{self.image_shape}; resize or crop them first, or reshape the net (fastsal follows "
                "net.reshape(), and never reshapes your net itself)"
            )
        if np.issubdtype(images.dtype, np.floating):
            # What Caffe will see: a finite float64 beyond float32's range becomes Inf.
            for rows in batch_slices(len(images), self.batch_size):
                start, part = rows.start, images[rows].astype(np.float32, copy=False)
                finite = np.isfinite(part).reshape(len(part), -1).all(axis=1)
                if not finite.all():
                    bad = start + int(np.argmin(finite))
                    raise ValueError(
                        f"images[{bad}] contains NaN or Inf once converted to float32; saliency is "
                        "undefined there"
                    )
        return images, single

    def _classes(self, classes, n: int) -> np.ndarray:
        """(N, K) int32 class ids from any accepted form, range-checked against the score blob."""
        if isinstance(classes, (bool, np.bool_)):
            raise TypeError("classes must be integers, got a bool")
        if isinstance(classes, numbers.Integral):
            ids = np.full((n, 1), int(classes), np.int64)
        elif isinstance(classes, (Sequence, np.ndarray)) and not isinstance(classes, (str, bytes)):
            array = np.asarray(classes)
            if array.size and not np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"classes must be integers, got dtype {array.dtype}")
            if array.ndim == 1:
                ids = np.broadcast_to(array.astype(np.int64), (n, array.shape[0]))
            elif array.ndim == 2:
                if array.shape[0] != n:
                    raise ValueError(
                        f"classes has {array.shape[0]} rows but there are {n} images; give one row per image "
                        "or a flat sequence for all"
                    )
                ids = array.astype(np.int64)
            else:
                raise ValueError(
                    f"classes must be an int, a sequence or an (N, K) array, got shape {array.shape}"
                )
        else:
            raise TypeError(
                f"classes must be an int, a sequence of ints or an (N, K) array, got {type(classes).__name__}"
            )
        if ids.shape[1] == 0:
            raise ValueError("classes is empty: give at least one class")
        bad = (ids < 0) | (ids >= self.num_classes)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"class {int(ids[where])} (classes[{where[0]}, {where[1]}]) is out of range: score blob "
                f"'{self.score}' has {self.num_classes} classes, 0 to {self.num_classes - 1}"
            )
        return np.ascontiguousarray(ids, dtype=np.int32)


def _check_net(net) -> None:
    if not isinstance(net, caffe.Net):
        raise TypeError(f"net must be a caffe.Net, got {type(net).__name__}")


def _check_blob_name(name: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a blob name (str), got {type(value).__name__}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# One Saliency per net, for the options of its latest call (an engine holds a batch of activations, so
# one per option set would grow without bound); weak keys, so the cache never keeps a user's net alive
# (the engine only shares the net's weight memory). Each Saliency follows its net's reshape/share_with.
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _saliency_for(net, score, input, batch_size, exact, threads) -> Saliency:  # noqa: A002
    _check_net(net)
    if threads is not None:  # before the cache: True and 1.0 would find threads=1's engine
        check_threads(threads)
    key = (score, input, batch_size, exact, threads)
    with _cache_lock:
        per_net = _cache.get(net)
        if per_net is None or key not in per_net:
            per_net = _cache[net] = {
                key: Saliency(
                    net, score=score, input=input, batch_size=batch_size, exact=exact, threads=threads
                )
            }
        return per_net[key]


def compute(
    net: caffe.Net,
    images,
    classes,
    *,
    score: str | None = None,
    input: str | None = None,  # noqa: A002
    batch_size: int | None = None,
    exact: bool = True,
    gradients: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """Saliency maps of ``images`` for ``classes`` under ``net``: see :class:`Saliency` and
    :meth:`Saliency.compute`. The internal engine is built on first use and cached per net."""
    engine = _saliency_for(net, score, input, batch_size, exact, threads)
    return engine.compute(images, classes, gradients=gradients)


def compute_top_k(
    net: caffe.Net,
    images,
    k: int = 1,
    *,
    score: str | None = None,
    input: str | None = None,  # noqa: A002
    batch_size: int | None = None,
    exact: bool = True,
    gradients: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Saliency maps for each image's ``k`` best classes: see :meth:`Saliency.compute_top_k`."""
    engine = _saliency_for(net, score, input, batch_size, exact, threads)
    return engine.compute_top_k(images, k, gradients=gradients)
