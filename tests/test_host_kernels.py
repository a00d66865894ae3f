"""What fastsal does with the CPU it runs on: the warning when Caffe's OpenBLAS runs its generic kernels,
and the arithmetic of the convolutions' data backward (fp32 Winograd from 28x28 output pixels up, bf16
in the inexact mode where the CPU has AMX), read from oneDNN's own log."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastsal
from conftest import NETS, _input, conv, fc, layer, make_net, write
from fastsal import _build

AVX512 = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize(
    "core, flags, fix",
    [
        ("Prescott", AVX512, "OPENBLAS_CORETYPE=SkylakeX"),
        ("Prescott", {"avx", "avx2", "fma"}, "OPENBLAS_CORETYPE=Haswell"),
        ("Nehalem", {"avx", "avx2", "fma"}, "OPENBLAS_CORETYPE=Haswell"),
        ("Prescott", {"sse3", "ssse3"}, None),  # a CPU that old: the generic kernels are its own
        ("SkylakeX", AVX512, None),
        ("Haswell", AVX512, None),  # a real choice for this CPU, if not the widest: left alone
        (None, AVX512, None),  # another BLAS than OpenBLAS
    ],
    ids=["avx512", "avx2", "nehalem-core", "old-cpu", "known-core", "haswell-core", "other-blas"],
)
def test_slow_blas_advice_names_the_core_and_the_fix(core, flags, fix):
    advice = _build.slow_blas_advice(core, flags)
    if fix is None:
        assert advice is None
    else:
        assert fix in advice and core in advice


def test_exact_cpu_engines_warn_once_when_openblas_runs_generic_kernels(tmp_path, monkeypatch):
    """On this host the warning comes exactly when the advice applies: once per process, from the first
    exact engine (the inexact mode's convolutions are oneDNN's and do not care)."""
    expected = _build.slow_blas_advice(fastsal.build_info()["openblas_core"], _build._cpu_flags())
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    monkeypatch.setattr(_build, "_blas_checked", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastsal.Saliency(net, exact=False)
        inexact_only = [w for w in caught if issubclass(w.category, fastsal.SlowBlasWarning)]
        fastsal.Saliency(net)
        fastsal.Saliency(net)
    slow = [str(w.message) for w in caught if issubclass(w.category, fastsal.SlowBlasWarning)]
    assert inexact_only == []
    assert slow == ([expected] if expected else [])


@pytest.mark.parametrize("call", ["Saliency", "compute", "attribute", "evaluate"])
def test_slow_blas_warning_names_the_callers_line(tmp_path, monkeypatch, call):
    """The warning points at the user's own line, not at fastsal's internals, whichever entry point
    builds the first exact engine (the advice is forced: this host may not need it)."""
    net = make_net(tmp_path, NETS["conv_maxpool_fc_softmax"][0])
    images = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    monkeypatch.setattr(_build, "_blas_checked", False)
    monkeypatch.setattr(_build, "slow_blas_advice", lambda core, flags: "forced advice")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if call == "Saliency":
            fastsal.Saliency(net)
        elif call == "compute":
            fastsal.compute(net, images, 0)
        elif call == "attribute":
            fastsal.attribute(net, images, 0, method="integrated_gradients", n_steps=2)
        else:
            fastsal.evaluate(net, images, [0], ["deletion"], method="saliency")
    slow = [w for w in caught if issubclass(w.category, fastsal.SlowBlasWarning)]
    assert [(w.filename, str(w.message)) for w in slow] == [(__file__, "forced advice")]


# conv_big's 32x32 output is Winograd's size, conv_small's 16x16 is not; conv_1x1 is pointwise.
THREE_LAYERS = (
    _input((16, 32, 32), batch=1)
    + conv("conv_big", "data", 16)
    + layer("relu", "ReLU", "conv_big", "conv_big")
    + layer("pool", "Pooling", "conv_big", params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    + conv("conv_small", "pool", 16)
    + conv("conv_1x1", "conv_small", 16, k=1, pad=0)
    + fc("score", "conv_1x1", 4)
)

BACKWARD_LOG = """
import sys
import numpy as np
import caffe
import fastsal
fastsal.set_caffe_log_level(2)
net = caffe.Net(sys.argv[1], caffe.TEST)
images = np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)
print("START", flush=True)
fastsal.compute(net, images, [0, 1], exact=sys.argv[2] == "exact")
"""


def _backward_kernels(prototxt: str, mode: str) -> dict[str, str]:
    """{"big" | "small" | "1x1": implementation} of each layer's data backward, from oneDNN's log."""
    env = dict(os.environ, DNNL_VERBOSE="1", ONEDNN_VERBOSE="1")
    result = subprocess.run(
        [sys.executable, "-c", BACKWARD_LOG, prototxt, mode], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = {}
    for line in result.stdout.split("START", 1)[1].splitlines():
        fields = line.split(",")
        if (
            len(fields) > 5
            and fields[1] == "exec"
            and fields[3] == "convolution"
            and fields[5] == "backward_data"
        ):
            kernels["1x1" if "kh1s" in line else "big" if "ih32" in line else "small"] = fields[4]
    return kernels


@pytest.mark.skipif(
    not fastsal.build_info()["onednn_isa"].startswith("avx512"),
    reason="oneDNN has Winograd (and AMX) kernels only on AVX-512 CPUs; elsewhere the direct kernel runs",
)
@pytest.mark.parametrize("mode", ["exact", "inexact"])
def test_data_backward_arithmetic_follows_the_layer_and_the_cpu(tmp_path, mode):
    kernels = _backward_kernels(write(tmp_path, THREE_LAYERS), mode)
    assert set(kernels) == {"big", "small", "1x1"}, kernels
    assert "bf16" not in kernels["1x1"] and "wino" not in kernels["1x1"], kernels
    if mode == "inexact" and fastsal.build_info()["inexact_backward"] == "bf16":
        assert "amx_bf16" in kernels["big"] and "amx_bf16" in kernels["small"], kernels
    else:
        assert "wino" in kernels["big"] and "wino" not in kernels["small"], kernels


FORWARD_LOG = """
import sys
import numpy as np
import caffe
import fastsal
fastsal.set_caffe_log_level(2)
net = caffe.Net(sys.argv[1], caffe.TEST)
images = np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)
exact = sys.argv[2] == "exact"
if sys.argv[3] == "perturbation":
    fastsal.attribute(net, images, 0, "occlusion", exact=exact, sliding_window_shapes=(16, 16), strides=16)
else:
    fastsal.compute(net, images, [0], exact=exact)
"""


def _forward_kernels(prototxt: str, mode: str, methods: str) -> dict[str, str]:
    """{"big" | "small" | "1x1": implementation, + " relu" where the convolution applies a ReLU post-op}
    of each layer's forward, from oneDNN's log."""
    env = dict(os.environ, DNNL_VERBOSE="1", ONEDNN_VERBOSE="1")
    result = subprocess.run(
        [sys.executable, "-c", FORWARD_LOG, prototxt, mode, methods], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = {}
    for line in result.stdout.splitlines():
        fields = line.split(",")
        if (
            len(fields) > 5
            and fields[1] == "exec"
            and fields[3] == "convolution"
            and fields[5].startswith("forward")
        ):
            layer = "1x1" if "kh1s" in line else "big" if "ih32" in line else "small"
            kernels[layer] = fields[4] + (" relu" if "eltwise_relu" in line else "")
    return kernels


@pytest.mark.skipif(not fastsal.build_info()["onednn_isa"], reason="built without oneDNN")
@pytest.mark.parametrize("mode", ["exact", "inexact"])
def test_perturbation_forward_runs_in_bf16_with_its_relus_fused(tmp_path, mode):
    """The perturbation methods' inexact forward: bf16 convolutions where the CPU has AMX (fp32
    accumulation) and a plain ReLU in place on a convolution applied by it; the gradient methods' inexact
    forward stays fp32 without post-ops (their masks follow every rounding); the exact forward is Caffe's."""
    prototxt = write(tmp_path, THREE_LAYERS)
    perturbation, gradient = (_forward_kernels(prototxt, mode, m) for m in ("perturbation", "gradient"))
    if mode == "exact":
        assert perturbation == gradient == {}, (perturbation, gradient)
        return
    assert set(perturbation) == set(gradient) == {"big", "small", "1x1"}, (perturbation, gradient)
    for name, kernel in perturbation.items():
        assert kernel.endswith(" relu") == (name == "big"), perturbation  # only conv_big has a ReLU on it
    bf16 = fastsal.build_info()["perturbation_forward"] == "bf16"
    assert all(("amx_bf16" in kernel) == bf16 for kernel in perturbation.values()), perturbation
    for kernel in gradient.values():
        assert "bf16" not in kernel and "relu" not in kernel, gradient
