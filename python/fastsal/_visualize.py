"""Pictures of maps: one definition of the heat-map overlay, for the demo and the jobs' --overlays."""

from __future__ import annotations

import numpy as np


def overlay(photo: np.ndarray, saliency_map: np.ndarray, colormap) -> np.ndarray:
    """The photo dimmed to grey under the map, coloured where the map is large; (H, W, 3) floats in [0, 1]."""
    heat = saliency_map / max(float(np.percentile(saliency_map, 99.5)), 1e-12)
    rgba = colormap(np.clip(heat, 0.0, 1.0))
    grey = photo.astype(np.float32).mean(axis=2, keepdims=True) / 255.0
    alpha = np.clip(heat, 0.0, 1.0)[..., None]
    return np.clip(0.6 * grey * (1 - alpha) + rgba[..., :3] * alpha, 0, 1)
