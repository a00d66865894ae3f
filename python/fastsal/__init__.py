"""fastsal: exact Simonyan et al. (2013) saliency maps and the gradient attribution family (SmoothGrad,
Integrated Gradients, Grad-CAM, guided backprop) for Caffe models, computed by a batched C++ engine.

maps = fastsal.compute(net, images, classes)   # net: a caffe.Net; maps: (N, K, H, W) float32
maps = fastsal.attribute(net, images, classes, method="smoothgrad")
scores = fastsal.evaluate(net, images, classes, ["deletion", "insertion"], method="smoothgrad")  # fastsal.metrics
"""

# pycaffe first: fastsal._core finds caffe.Net through the Boost.Python types pycaffe registers.
import caffe  # noqa: F401

from . import _threads

with _threads.bounded_spinning():  # while fastsal._core loads libgomp
    from . import _core  # noqa: F401

from . import metrics
from ._attribution import METHODS, Attribution, attribute
from ._build import SlowBlasWarning, build_info, cuda_device_count, has_cuda, set_caffe_log_level
from ._dream import dream, visualize_classes
from ._load import MissingWeightsWarning, load
from ._preprocess import Preprocessing, load_image
from ._saliency import Saliency, compute, compute_top_k
from .metrics import evaluate

__all__ = [
    "METHODS",
    "Attribution",
    "MissingWeightsWarning",
    "Preprocessing",
    "Saliency",
    "SlowBlasWarning",
    "attribute",
    "build_info",
    "compute",
    "compute_top_k",
    "dream",
    "evaluate",
    "metrics",
    "cuda_device_count",
    "has_cuda",
    "load",
    "load_image",
    "set_caffe_log_level",
    "visualize_classes",
]
__version__ = "0.1.0"

# Public submodules that cost more to import, reached as fastsal.examples, fastsal.jobs, ... on first use.
_LAZY = ("examples", "jobs", "report", "torch_port")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastsal' has no attribute {name!r}")
