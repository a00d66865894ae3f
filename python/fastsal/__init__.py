"""fastsal: exact Simonyan et al. (2013) saliency maps and the gradient attribution family (SmoothGrad,
Integrated Gradients, Grad-CAM, guided backprop) for Caffe models, computed by a batched C++ engine.

maps = fastsal.compute(net, images, classes)   # net: a caffe.Net; maps: (N, K, H, W) float32
maps = fastsal.attribute(net, images, classes, method="smoothgrad")
"""

import os

# OpenMP threads (oneDNN's, fastsal's) that spin after their work would fight OpenBLAS's threads for the
# cores; sleeping ones do not. Read once, when libgomp loads: set before fastsal._core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
