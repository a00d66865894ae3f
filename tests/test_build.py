"""The foundation: pycaffe and fastsal import from one Caffe build, and pycaffe itself works."""

from __future__ import annotations

import os

import caffe
import numpy as np
from caffe import layers as L
from caffe import params as P

import fastsal


def test_build_info_names_the_loaded_caffe():
    info = fastsal.build_info()
    assert info["caffe_version"] == caffe.__version__ == "1.0.0"
    assert info["cuda"] is fastsal.has_cuda()
    assert info["blas"]
    # fastsal's libcaffe is the very file pycaffe loaded: one Caffe in the process.
    loaded = fastsal._build._loaded_libcaffe_files()
    assert loaded == {os.path.realpath(info["libcaffe"])}


def test_pycaffe_netspec_forward_and_backward(tmp_path):
    spec = caffe.NetSpec()
    spec.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    spec.conv = L.Convolution(spec.data, num_output=4, kernel_size=3, weight_filler=dict(type="xavier"))
    spec.pool = L.Pooling(spec.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    spec.fc = L.InnerProduct(spec.pool, num_output=3, weight_filler=dict(type="xavier"))
    path = tmp_path / "net.prototxt"
    path.write_text("force_backward: true\n" + str(spec.to_proto()))
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = net.forward(data=x)["fc"]
    assert out.shape == (2, 3) and np.isfinite(out).all() and np.abs(out).max() > 0
    net.blobs["fc"].diff[...] = 1
    grad = net.backward()["data"]
    assert grad.shape == x.shape and np.abs(grad).max() > 0


def test_log_level_is_checked():
    import pytest

    with pytest.raises(ValueError, match="level must be 0"):
        fastsal.set_caffe_log_level(5)
