"""Resampling maps between a layer's grid and the input's: the CAM family's upsampling, with
PyTorch's conventions so that fastsal agrees with Captum and pytorch-grad-cam on the same weights."""

from __future__ import annotations

import numpy as np


def upsample(maps: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(..., h, w) -> (..., H, W), with torch.nn.functional.interpolate's conventions: ``"bilinear"``
    with align_corners=False (OpenCV's INTER_LINEAR), ``"bilinear_corners"`` with align_corners=True
    (torch's UpsamplingBilinear2d: corner pixels' centres meet), or ``"nearest"`` (floor(i * h / H))."""

    def axis(n_in: int, n_out: int):
        scale = n_in / n_out
        if mode == "nearest":
            index = np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)
            return index, index, np.zeros(n_out, np.float32)
        if mode == "bilinear_corners":
            source = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        else:
            source = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (source - low).astype(np.float32)

    (r0, r1, fr), (c0, c1, fc) = axis(maps.shape[-2], size[0]), axis(maps.shape[-1], size[1])
    rows = maps[..., r0, :] * (1 - fr)[:, None] + maps[..., r1, :] * fr[:, None]
    return (rows[..., c0] * (1 - fc) + rows[..., c1] * fc).astype(np.float32)
