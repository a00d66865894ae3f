"""fastsal: exact Simonyan et al. (2013) saliency maps and the gradient attribution family (SmoothGrad,
Integrated Gradients, Grad-CAM, guided backprop) for Caffe models, computed by a batched C++ engine.

maps = fastsal.compute(net, images, classes)   # net: a caffe.Net; maps: (N, K, H, W) float32
maps = fastsal.attribute(net, images, classes, method="smoothgrad")
"""

import os
import warnings


# OpenMP threads (oneDNN's, fastsal's) that spin after their work would fight OpenBLAS's threads for the
# cores; sleeping ones do not. libgomp reads the policy once, when it loads: set before fastsal._core.
# If another package (torch bundles a libgomp) loaded it first, the policy is fixed already.
def _openmp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return "libgomp" in maps.read()
    except OSError:
        return False


if "OMP_WAIT_POLICY" not in os.environ:
    if _openmp_loaded():
        warnings.warn(
            "an OpenMP runtime was loaded before fastsal (import torch comes first?) and its threads spin "
            "after each parallel region, contending with OpenBLAS's threads: fastsal's CPU path runs up to "
            "1.5x slower. Import fastsal first, or set OMP_WAIT_POLICY=PASSIVE in the environment",
            RuntimeWarning,
            stacklevel=2,
        )
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# pycaffe first: fastsal._core finds caffe.Net through the Boost.Python types pycaffe registers.
import caffe  # noqa: E402, F401

from ._attribution import METHODS, Attribution, attribute  # noqa: E402
from ._build import build_info, cuda_device_count, has_cuda, set_caffe_log_level  # noqa: E402
from ._dream import dream, visualize_classes  # noqa: E402
from ._load import load  # noqa: E402
from ._preprocess import Preprocessing  # noqa: E402
from ._saliency import Saliency, compute, compute_top_k  # noqa: E402

__all__ = [
    "METHODS",
    "Attribution",
    "Preprocessing",
    "Saliency",
    "attribute",
    "build_info",
    "compute",
    "compute_top_k",
    "dream",
    "cuda_device_count",
    "has_cuda",
    "load",
    "set_caffe_log_level",
    "visualize_classes",
]
__version__ = "0.1.0"
