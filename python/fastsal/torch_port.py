"""A Caffe net as a PyTorch module with the same weights, layer by layer: how fastsal is checked against
Captum, and how the benchmarks time Captum on the same model. Needs torch (``pip install .[bench]``).

Layers: Input, Convolution, InnerProduct, ReLU (leaky too), PReLU, Sigmoid, TanH, ELU, Pooling (MAX/AVE with
Caffe's ceil rounding, global), BatchNorm (with its scale-factor blob), Scale, Bias, Eltwise (SUM with
coefficients, PROD, MAX), Concat, Flatten, Split, Dropout (TEST: identity), LRN (across channels),
Softmax. Every Caffe layer becomes its own module, so Captum's hooks (on nn.ReLU for guided backprop,
on a layer for Grad-CAM) see exactly the Caffe layer.
"""

from __future__ import annotations

import contextlib

import caffe
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own name for it
from torch import nn


class _Eltwise(nn.Module):
    def __init__(self, operation: int, coefficients):
        super().__init__()
        self.operation, self.coefficients = operation, list(coefficients)

    def forward(self, *inputs):
        if self.operation == 0:  # PROD
            out = inputs[0]
            for x in inputs[1:]:
                out = out * x
            return out
        if self.operation == 2:  # MAX
            return torch.stack(inputs).amax(dim=0)
        coefficients = self.coefficients or [1.0] * len(inputs)
        return sum(c * x for c, x in zip(coefficients, inputs))


class _Concat(nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, *inputs):
        return torch.cat(inputs, dim=self.axis)


class _Affine(nn.Module):
    """Caffe's Scale and Bias along axis 1: x * scale + bias, per channel."""

    def __init__(self, scale, bias):
        super().__init__()
        self.scale = (
            None if scale is None else nn.Parameter(torch.from_numpy(scale.copy()), requires_grad=False)
        )
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.scale is not None:
            x = x * self.scale.view(shape)
        if self.bias is not None:
            x = x + self.bias.view(shape)
        return x


class _Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class _Identity(nn.Module):
    def forward(self, *inputs):
        return inputs if len(inputs) > 1 else inputs[0]


class _Copy(nn.Module):
    def forward(self, x):
        return x.clone()


class CaffeModule(nn.Module):
    """Runs the layers of a caffe.Net in order on a dict of blobs; ``forward`` returns ``output``."""

    def __init__(self, net: caffe.Net, params: dict, output: str, input: str = "data"):  # noqa: A002
        super().__init__()
        self.input, self.output = input, output
        self.steps: list[tuple[str, list[str], list[str]]] = []
        self.layers = nn.ModuleDict()
        for name, layer in zip(net._layer_names, net.layers):
            if layer.type == "Input":
                continue
            module = self._translate(
                net, name, layer, params.get(name, caffe.proto.caffe_pb2.LayerParameter())
            )
            self.layers[name.replace(".", "_")] = module
            self.steps.append(
                (name.replace(".", "_"), list(net.bottom_names[name]), list(net.top_names[name]))
            )
        self.eval()

    def copy_pooling_inputs(self) -> CaffeModule:
        """Gives every max pooling a copy of its input, for Captum's ``DeepLift``: Captum 0.9.0 hooks the
        gradient of a module's input tensor, and a nonlinearity whose output is that same tensor keeps the
        pooling's plain gradient as its own, read before the pooling's rule replaces it, so the rule is
        lost (captum#1104; its own convergence delta shows it). The copy makes two tensors of one; values
        unchanged."""
        for key, module in list(self.layers.items()):
            if isinstance(module, nn.MaxPool2d):
                self.layers[key] = nn.Sequential(_Copy(), module)
        return self

    def module_for(self, blob: str) -> nn.Module:
        """The module whose output is the blob's final value (the last layer writing it)."""
        return self.layers[[key for key, _, tops in self.steps if blob in tops][-1]]

    def forward(self, x):
        blobs = {self.input: x}
        for key, bottoms, tops in self.steps:
            out = self.layers[key](*(blobs[b] for b in bottoms))
            outs = out if isinstance(out, tuple) else (out,) * len(tops)
            blobs.update(zip(tops, outs))
            if self.output in tops and key == self._last_writer:
                break
        return blobs[self.output]

    @property
    def _last_writer(self):
        return [key for key, _, tops in self.steps if self.output in tops][-1]

    @staticmethod
    def _translate(net: caffe.Net, name: str, layer, param) -> nn.Module:
        p = layer.type
        blobs = [b.data.astype(np.float32) for b in net.params[name]] if name in net.params else []
        if p == "Convolution":
            cp = param.convolution_param
            kernel = _pair(cp.kernel_size, cp.kernel_h, cp.kernel_w)
            stride = _pair(cp.stride or [1], cp.stride_h, cp.stride_w)
            pad = _pair(cp.pad or [0], cp.pad_h, cp.pad_w)
            dilation = _pair(cp.dilation or [1], 0, 0)
            conv = nn.Conv2d(
                blobs[0].shape[1] * cp.group,
                blobs[0].shape[0],
                kernel,
                stride=stride,
                padding=pad,
                dilation=dilation,
                groups=cp.group,
                bias=cp.bias_term,
            )
            conv.weight.data = torch.from_numpy(blobs[0].copy())
            if cp.bias_term:
                conv.bias.data = torch.from_numpy(blobs[1].copy())
            return conv
        if p == "InnerProduct":
            fc = nn.Linear(blobs[0].shape[1], blobs[0].shape[0], bias=len(blobs) > 1)
            fc.weight.data = torch.from_numpy(blobs[0].copy())
            if len(blobs) > 1:
                fc.bias.data = torch.from_numpy(blobs[1].copy())
            return nn.Sequential(_Flatten(), fc)
        if p == "ReLU":
            slope = param.relu_param.negative_slope
            return nn.LeakyReLU(slope) if slope else nn.ReLU()
        if p == "PReLU":
            prelu = nn.PReLU(blobs[0].size)
            prelu.weight.data = torch.from_numpy(blobs[0].copy())
            return prelu
        if p == "Sigmoid":
            return nn.Sigmoid()
        if p == "TanH":
            return nn.Tanh()
        if p == "ELU":
            return nn.ELU(param.elu_param.alpha)
        if p == "Pooling":
            pp = param.pooling_param
            shape = net.blobs[net.bottom_names[name][0]].data.shape
            kernel = shape[2:] if pp.global_pooling else _pair([pp.kernel_size], pp.kernel_h, pp.kernel_w)
            stride = (1, 1) if pp.global_pooling else _pair([pp.stride], pp.stride_h, pp.stride_w)
            pad = _pair([pp.pad], pp.pad_h, pp.pad_w)
            if pp.pool == 0:
                return nn.MaxPool2d(kernel, stride, pad, ceil_mode=True)
            return nn.AvgPool2d(kernel, stride, pad, ceil_mode=True, count_include_pad=True)
        if p == "BatchNorm":
            factor = blobs[2][0]
            factor = 0.0 if factor == 0 else 1.0 / factor
            bn = nn.BatchNorm2d(blobs[0].size, eps=param.batch_norm_param.eps, affine=False)
            bn.running_mean.data = torch.from_numpy(blobs[0] * factor)
            bn.running_var.data = torch.from_numpy(blobs[1] * factor)
            return bn
        if p == "Scale":
            return _Affine(blobs[0], blobs[1] if len(blobs) > 1 else None)
        if p == "Bias":
            return _Affine(None, blobs[0])
        if p == "Eltwise":
            return _Eltwise(param.eltwise_param.operation, param.eltwise_param.coeff)
        if p == "Concat":
            return _Concat(param.concat_param.axis)
        if p == "Flatten":
            return _Flatten()
        if p in ("Split", "Dropout"):
            return _Identity()
        if p == "LRN":
            lp = param.lrn_param
            return nn.LocalResponseNorm(lp.local_size, lp.alpha, lp.beta, lp.k)
        if p == "Softmax":
            return nn.Softmax(dim=1)
        raise NotImplementedError(f"layer '{name}' ({p}) has no PyTorch translation here")


def _pair(values, h: int, w: int) -> tuple[int, int]:
    if h or w:
        return (h, w)
    values = list(values)
    return (values[0], values[-1]) if values else (0, 0)


def to_torch(net: caffe.Net, prototxt: str, output: str, input: str = "data") -> CaffeModule:  # noqa: A002
    """``net`` (with its weights) as a :class:`CaffeModule` computing blob ``output``; ``prototxt`` is the
    file the net was built from (pycaffe does not expose layer parameters)."""
    from google.protobuf import text_format

    parameter = caffe.proto.caffe_pb2.NetParameter()
    with open(prototxt) as f:
        text_format.Merge(f.read(), parameter)
    # (Caffe's automatic Split layers are not in the prototxt: they get an empty parameter.)
    return CaffeModule(net, {layer.name: layer for layer in parameter.layer}, output, input)


@contextlib.contextmanager
def deeplift_summing_unpool():
    """Within it, Captum's ``DeepLift`` unpools its max-pooling shares by summing them, as the gradient
    does. Captum 0.9.0's ``F.max_unpool2d`` writes each position once, so where overlapping windows (3x3
    at stride 2) share their maximum all but one window's share are lost, and with them completeness (its
    own convergence delta shows it). The rule is otherwise Captum's own function."""
    from captum.attr._core import deep_lift

    def unpool(values, indices, kernel_size, stride, padding, output_size):
        n, c = values.shape[:2]
        out = values.new_zeros((n, c, output_size[-2] * output_size[-1]))
        out.scatter_add_(2, indices.reshape(n, c, -1), values.reshape(n, c, -1))
        return out.reshape(n, c, output_size[-2], output_size[-1])

    def maxpool2d(module, inputs, outputs, grad_input, grad_output, eps=1e-10):
        return deep_lift.maxpool(
            module, F.max_pool2d, unpool, inputs, outputs, grad_input, grad_output, eps=eps
        )

    saved = deep_lift.SUPPORTED_NON_LINEAR[nn.MaxPool2d]
    deep_lift.SUPPORTED_NON_LINEAR[nn.MaxPool2d] = maxpool2d
    try:
        yield
    finally:
        deep_lift.SUPPORTED_NON_LINEAR[nn.MaxPool2d] = saved
