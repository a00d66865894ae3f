"""fastsal: exact Simonyan et al. (2013) saliency maps for Caffe models, computed by a C++ engine.

    maps = fastsal.compute(net, images, classes)   # net: a caffe.Net; maps: (N, K, H, W) float32
"""

# pycaffe first: fastsal._core finds caffe.Net through the Boost.Python types pycaffe registers.
import caffe  # noqa: F401

from ._build import build_info, has_cuda, set_caffe_log_level
from ._load import load
from ._saliency import Saliency, compute, compute_top_k

__all__ = ["Saliency", "build_info", "compute", "compute_top_k", "has_cuda", "load", "set_caffe_log_level"]
__version__ = "0.1.0"
