"""The forward-only path: class scores for many perturbed copies of images (perturbation methods,
faithfulness metrics), streamed through the engine in batches with no backward pass. Callers hand over
a function that builds rows on demand, so memory stays bounded by ``batch_size`` however many copies."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._saliency import Saliency, batch_slices

Rows = Callable[[int, int], np.ndarray]  # (start, stop) -> rows start..stop-1, (stop - start, *row shape)
Consume = Callable[[int, int, np.ndarray], None]  # (start, stop, scores (stop - start, num_classes))


class Forward:
    """Forward passes of one ``caffe.Net`` through fastsal's internal net, built without
    force_backward: Caffe allocates no diff, and batches are sized by the blobs' data alone.

    ``layer`` names a blob between the input and the score: :meth:`activations` returns its values,
    and :meth:`stream` with ``from_layer=True`` takes rows of its values and runs only the layers above
    it (Ablation-CAM). The other arguments mean what they mean for :class:`fastsal.Saliency`; with
    ``exact=False`` the convolutions' forward runs through oneDNN (faster, rounded differently).
    """

    def __init__(self, net, *, layer: str | None = None, **engine):
        self._engine = Saliency(net, **engine, _gradient_blob=layer or "", _forward_only=True)

    @property
    def num_classes(self) -> int:
        return self._engine.num_classes

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self._engine.image_shape

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """One image's shape of the layer blob (the image shape without a layer)."""
        return tuple(self._engine._engine.gradient_shape)

    @property
    def layer(self) -> str:
        return self._engine._engine.gradient_blob

    @property
    def batch_size(self) -> int:
        return self._engine.batch_size

    def refresh(self) -> None:
        """Rebuilds the internal net if the user's net changed (reshape, share_with)."""
        self._engine._refresh()

    def stream(self, count: int, rows: Rows, consume: Consume, *, from_layer: bool = False) -> None:
        """Runs rows 0..count-1, built by ``rows(start, stop)`` one batch at a time, and hands each
        batch's scores to ``consume(start, stop, scores)``. Rows are images, or the layer blob's values
        with ``from_layer``. A row whose activations overflow float32 raises ValueError naming it."""
        engine = self._engine._engine
        if count == 0:  # still checks that the net allows a forward from the layer
            shape = self.layer_shape if from_layer else self.image_shape
            engine.scores(
                np.empty((0, *shape), np.float32),
                np.empty((0, self.num_classes), np.float32),
                0,
                from_layer=from_layer,
            )
        for part in batch_slices(count, self.batch_size):
            batch = np.ascontiguousarray(rows(part.start, part.stop), dtype=np.float32)
            scores = np.empty((len(batch), self.num_classes), np.float32)
            engine.scores(batch, scores, part.start, from_layer=from_layer)
            consume(part.start, part.stop, scores)

    def scores(self, images: np.ndarray) -> np.ndarray:
        """The score blob's values of (N, C, H, W) images, (N, num_classes)."""
        return self._engine._scores(images)

    def activations(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the layer blob's values (N, *layer_shape), the scores (N, num_classes)) of images."""
        engine = self._engine._engine
        n = len(images)
        values = np.empty((n, *self.layer_shape), np.float32)
        out = np.empty((n, self.num_classes), np.float32)
        for part in batch_slices(n, self.batch_size):
            batch = np.ascontiguousarray(images[part], dtype=np.float32)
            engine.scores(batch, out[part], part.start, activations=values[part])
        return values, out


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities from class scores over the last axis, as Caffe's Softmax computes them (the max
    subtracted first), in float64 then float32."""
    shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
