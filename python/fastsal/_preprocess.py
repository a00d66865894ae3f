"""Caffe's image preprocessing, defined once for jobs, the CLI and dream: decode as caffe.io.load_image
does, resize to ``images_dim`` with caffe.io.resize_image, centre-crop to the net's input as
caffe.Classifier does, then caffe.io.Transformer's order: transpose, channel swap, raw scale, mean
subtraction, input scale. Flag names follow Caffe's python/classify.py."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Where pictures in [0, 1] come from, for the errors that ask for them.
_PICTURES_IN_0_1 = "fastsal.load_image, caffe.io.load_image or skimage.img_as_float give them"


class ImageError(ValueError):
    """An image that cannot be used; the job records its reason and goes on."""


def load_image(path, color: bool = True) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1] (or (H, W, 1) when not color), the values caffe.io.load_image
    returns: grayscale tiled to 3 channels, alpha dropped, 16-bit scaled to [0, 1], 32-bit integer TIFFs
    scaled by their type's range and float TIFFs kept as they are (scikit-image's img_as_float).

    Where caffe.io.load_image misreads a file, this gives the picture Pillow shows (``convert("RGB")``)
    instead: palette images with an alpha band ("PA": Caffe reads palette indices), CMYK, YCbCr TIFFs and
    LAB (Caffe reads the bands as RGB), grey with alpha ("LA": Caffe returns 2 channels), GIFs (Caffe
    returns every frame; this the first) and 16-bit PGM/PPM (Caffe scales them by 2**31). Decoded by
    Pillow from the file's bytes, so a file that is no image leaves no handle open behind its error."""
    with open(path, "rb") as f:
        return decode_image(f.read(), color)


def decode_image(data: bytes, color: bool = True) -> np.ndarray:
    """:func:`load_image` on a file's bytes already read (jobs hash the same bytes)."""
    import io

    import skimage
    import skimage.color
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
            image = _samples(decoded)
    except Exception as error:  # every decoder failure is the image's: truncated, corrupt, not an image
        raise ImageError(_decode_failure(error)) from None
    if image.ndim not in (2, 3) or image.size == 0:
        raise ImageError(f"not a 2-D image: decoded shape {image.shape}")
    image = skimage.img_as_float(image).astype(np.float32)
    if image.ndim == 3 and image.shape[2] == 4:  # alpha dropped
        image = image[:, :, :3]
    if not color and image.ndim == 3:
        image = skimage.color.rgb2gray(image).astype(np.float32)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if color and image.shape[2] == 1:
        image = np.tile(image, (1, 1, 3))
    return image


def _samples(decoded) -> np.ndarray:
    """The decoded picture as grey, RGB or RGBA samples in the integer or float type img_as_float scales."""
    mode = decoded.mode
    if mode in ("L", "RGB", "RGBA", "F") or mode.startswith("I;16"):
        return np.asarray(decoded)
    if mode == "I":
        samples = np.asarray(decoded)
        if decoded.format == "TIFF":  # the file's own integer type, as tifffile reads it for Caffe
            bits = decoded.tag_v2.get(258, (32,))[0]
            signed = decoded.tag_v2.get(339, (1,))[0] == 2  # SampleFormat: 1 unsigned (the default), 2 signed
            return samples.astype(f"{'i' if signed else 'u'}{bits // 8}") if bits in (16, 32) else samples
        return np.clip(samples, 0, 65535).astype(np.uint16)  # Pillow widens 16-bit PNG and PGM/PPM to "I"
    if mode in ("1", "LA"):
        return np.asarray(decoded.convert("L"))
    # Palettes, CMYK, YCbCr, LAB, HSV: the colours shown. Through RGBA where there is alpha, since
    # Pillow warns when it drops a palette's alpha itself.
    alpha = "A" in mode or "transparency" in decoded.info
    return np.asarray(decoded.convert("RGBA" if alpha else "RGB"))


def _decode_failure(error: Exception) -> str:
    """A reason that is the same on every run: Pillow's messages name the BytesIO by its address."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        text = "not an image file Pillow recognises"
    else:
        lines = str(error).strip().splitlines()
        text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", lines[0]) if lines else ""
    return f"cannot decode ({type(error).__name__})" + (f": {text}" if text else "")


def load_mean(path) -> np.ndarray:
    """A mean from a .binaryproto (Caffe's compute_image_mean) or a .npy file, as (C, H, W) or (C,)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mean file not found: {path}")
    if path.suffix == ".npy":
        mean = np.load(path)
    else:
        import caffe

        blob = caffe.proto.caffe_pb2.BlobProto()
        try:
            blob.ParseFromString(path.read_bytes())
            mean = caffe.io.blobproto_to_array(blob)[0]
        except Exception as error:
            raise ValueError(f"mean file {path} is not a BlobProto (.binaryproto): {error}") from None
    return np.asarray(mean, np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """Caffe's preprocessing for a net input of shape ``input_shape`` (C, H, W)."""

    input_shape: tuple[int, int, int]
    images_dim: tuple[int, int] | None = None  # resize to this first (default: the input's H, W)
    mean: np.ndarray | None = None  # (C,) or (C, H, W), subtracted after raw_scale
    raw_scale: float | None = 255.0  # classify.py's default: load_image gives [0, 1]
    channel_swap: tuple[int, ...] | None = (2, 1, 0)  # classify.py's default: RGB to BGR
    input_scale: float | None = None

    def __post_init__(self):
        c, h, w = self.input_shape
        if c not in (1, 3):
            raise ValueError(
                f"the net takes {c}-channel images; image files give 1 or 3 (use a .npy of inputs)"
            )
        if self.images_dim is not None:
            if len(self.images_dim) != 2 or min(self.images_dim) < 1:
                raise ValueError(f"images_dim must be two positive sizes, got {self.images_dim}")
            if self.images_dim[0] < h or self.images_dim[1] < w:
                raise ValueError(
                    f"images_dim {tuple(self.images_dim)} is smaller than the net's input {h}x{w}"
                )
        if self.channel_swap is not None and sorted(self.channel_swap) != list(range(c)):
            raise ValueError(f"channel_swap must order the {c} channels 0..{c - 1}, got {self.channel_swap}")
        if self.mean is not None:
            mean = np.asarray(self.mean, np.float32)
            if mean.shape not in ((c,), (c, h, w)):
                raise ValueError(
                    f"mean has shape {mean.shape}, but the net's input is {(c, h, w)}: give ({c},) values or a "
                    f"({c}, {h}, {w}) image (for a larger mean image, take its per-channel mean: mean.mean((1, 2)))"
                )
            object.__setattr__(self, "mean", mean)
        for name in ("raw_scale", "input_scale"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")

    def describe(self) -> dict:
        """JSON-able, exact: the job's plan records it."""
        mean = None
        if self.mean is not None:
            mean = (
                self.mean.tolist()
                if self.mean.ndim == 1
                else {
                    "shape": list(self.mean.shape),
                    "sha256": hashlib.sha256(self.mean.tobytes()).hexdigest(),
                }
            )
        return {
            "input_shape": list(self.input_shape),
            "images_dim": None if self.images_dim is None else list(self.images_dim),
            "mean": mean,
            "raw_scale": self.raw_scale,
            "channel_swap": None if self.channel_swap is None else list(self.channel_swap),
            "input_scale": self.input_scale,
        }

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The (H, W, C) image resized and centre-cropped to the net's input size, still in [0, 1] RGB."""
        import caffe.io

        _, h, w = self.input_shape
        dims = self.images_dim or (h, w)
        if image.shape[:2] != tuple(dims):
            image = caffe.io.resize_image(image, dims)
        top, left = (dims[0] - h) // 2, (dims[1] - w) // 2
        return image[top : top + h, left : left + w]

    def to_original(self, saliency_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A map of the net's input (H, W) placed on the original picture of ``size`` (height, width): the
        inverse of :meth:`crop`, sampled bilinearly at each original pixel's centre as skimage's resize
        (which caffe.io.resize_image calls) places it; NaN outside the centre crop."""
        from scipy.ndimage import map_coordinates

        _, h, w = self.input_shape
        dims = self.images_dim or (h, w)
        top, left = (dims[0] - h) // 2, (dims[1] - w) // 2
        # pixel centres: original y <-> resized (y + 0.5) * dims / size - 0.5, then the crop's offset
        rows = (np.arange(size[0]) + 0.5) * dims[0] / size[0] - 0.5 - top
        cols = (np.arange(size[1]) + 0.5) * dims[1] / size[1] - 0.5 - left
        grid = np.meshgrid(rows, cols, indexing="ij")
        values = np.asarray(saliency_map, np.float64)
        placed = map_coordinates(values, grid, order=1, mode="nearest")
        inside = (grid[0] >= -0.5) & (grid[0] <= h - 0.5) & (grid[1] >= -0.5) & (grid[1] <= w - 0.5)
        return np.where(inside, placed, np.nan).astype(np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """A decoded (H, W, C) image in [0, 1] (:func:`load_image`, caffe.io.load_image) as the net's
        (C, H, W) float32 input."""
        image = np.asarray(image)
        if not np.issubdtype(image.dtype, np.floating):
            # raw_scale expects [0, 1]: uint8 pixels would come out 255 times too large, silently
            raise TypeError(f"image must hold floats in [0, 1] ({_PICTURES_IN_0_1}), got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, np.newaxis]
        if image.ndim != 3:
            raise ValueError(f"image must be (H, W, C) or (H, W), got shape {image.shape}")
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        if low < -1e-3 or high > 1 + 1e-3:  # 0-255 floats would come out 255 times too large, silently
            raise ImageError(
                f"pixel values run from {low:g} to {high:g}; the preprocessing takes pictures in [0, 1] "
                f"({_PICTURES_IN_0_1})"
            )
        return self.transform(self.crop(image))

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Transformer's steps without the resize and crop (any image size; a per-channel mean)."""
        if self.mean is not None and self.mean.ndim == 3 and image.shape[:2] != tuple(self.input_shape[1:]):
            raise ValueError("a mean image fits the net's input size only: give per-channel mean values")
        x = image.astype(np.float32).transpose(2, 0, 1)
        if self.channel_swap is not None:
            x = x[list(self.channel_swap)]
        if self.raw_scale is not None:
            x = x * np.float32(self.raw_scale)
        if self.mean is not None:
            x = x - (self.mean[:, None, None] if self.mean.ndim == 1 else self.mean)
        if self.input_scale is not None:
            x = x * np.float32(self.input_scale)
        return np.ascontiguousarray(x, dtype=np.float32)

    def valid_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high): the net input's values for pictures of all 0s and all 1s, elementwise ordered, the
        (C, H, W) bounds every preprocessed picture lies within (LRP's z-box bounds)."""
        c, h, w = self.input_shape
        dark, bright = (self.transform(np.full((h, w, c), v, np.float32)) for v in (0.0, 1.0))
        return np.minimum(dark, bright), np.maximum(dark, bright)

    def deprocess(self, x: np.ndarray) -> np.ndarray:
        """The inverse of __call__ after the crop: a net input (C, H, W) as a displayable (H, W, 3) uint8."""
        x = np.asarray(x, np.float32)
        if self.input_scale is not None:
            x = x / np.float32(self.input_scale)
        if self.mean is not None:
            x = x + (self.mean[:, None, None] if self.mean.ndim == 1 else self.mean)
        if self.raw_scale is not None:
            x = x / np.float32(self.raw_scale)
        if self.channel_swap is not None:
            x = x[np.argsort(self.channel_swap)]
        image = np.clip(x.transpose(1, 2, 0), 0, 1)
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return (image * 255 + 0.5).astype(np.uint8)
