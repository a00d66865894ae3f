"""LRP against zennit on the same weights (fastsal.torch_port): every named composite and every rule, on the
small test nets, to 1e-4 of each map's largest relevance. zennit's composites apply to torch_port's plain
modules; two things are set up as fastsal's canonizers see them: the Eltwise sum becomes zennit's Sum (its
Norm rule), and BatchNorm + Scale are merged into the convolution before them in the torch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
zennit = pytest.importorskip("zennit")

from torch import nn  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    ExcitationBackprop,
    NameMapComposite,
)
from zennit.layer import Sum  # noqa: E402
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus  # noqa: E402

import fastsal  # noqa: E402
from conftest import random_images, spearman  # noqa: E402
from fastsal import lrp  # noqa: E402
from fastsal.torch_port import to_torch  # noqa: E402

LOW, HIGH = -2.5, 2.5  # zbox's bounds; the test images are standard normal, mostly inside them


class _StackedSum(nn.Module):
    """Caffe's Eltwise SUM as zennit's canonizers write a residual sum: a Sum over stacked inputs."""

    def __init__(self, coefficients):
        super().__init__()
        self.coefficients = list(coefficients)
        self.sum = Sum()

    def forward(self, *inputs):
        coefficients = self.coefficients or [1.0] * len(inputs)
        return self.sum(torch.stack([c * x for c, x in zip(coefficients, inputs)], dim=-1))


def zennit_model(net, path, score):
    """torch_port's model, with zennit's Sum for Eltwise SUM and BatchNorm + Scale merged into the
    convolution before them (zennit's SequentialMergeBatchNorm needs an nn.Sequential)."""
    model = to_torch(net, path, score)
    keys = [key for key, _, _ in model.steps]
    for index, key in enumerate(keys):
        module = model.layers[key]
        if type(module).__name__ == "_Eltwise" and module.operation == 1:
            model.layers[key] = _StackedSum(module.coefficients)
        if isinstance(module, nn.BatchNorm2d) and isinstance(model.layers[keys[index - 1]], nn.Conv2d):
            conv = model.layers[keys[index - 1]]
            a = 1 / torch.sqrt(module.running_var + module.eps)
            c = -module.running_mean * a
            after = model.layers[keys[index + 1]] if index + 1 < len(keys) else None
            if type(after).__name__ == "_Affine":
                a, c = a * after.scale, c * after.scale + (0 if after.bias is None else after.bias)
                model.layers[keys[index + 1]] = nn.Identity()
            with torch.no_grad():
                bias = conv.bias if conv.bias is not None else torch.zeros_like(a)
                conv.weight.mul_(a.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias * a + c, requires_grad=False)
            model.layers[key] = nn.Identity()
    return model


def zennit_relevance(model, composite, images, classes, num_classes):
    """(N, K, C, H, W): zennit's Gradient attributor, relevance starting at each class's one-hot."""
    out = []
    with Gradient(model, composite) as attributor:
        for k in range(classes.shape[1]):
            x = torch.from_numpy(images.copy()).requires_grad_()
            _, relevance = attributor(x, torch.eye(num_classes)[torch.from_numpy(classes[:, k])])
            out.append(relevance.detach().numpy())
    return np.stack(out, axis=1)


def assert_close_per_map(actual, expected, rtol=1e-4):
    for n in range(expected.shape[0]):
        for k in range(expected.shape[1]):
            scale = float(np.abs(expected[n, k]).max())
            assert scale > 0
            np.testing.assert_allclose(actual[n, k], expected[n, k], rtol=0, atol=rtol * scale)


EXTRA = [(nn.LocalResponseNorm, Pass())]  # fastsal passes relevance through LRN (zennit has no rule for it)
COMPOSITES = {
    "epsilon_plus": lambda: EpsilonPlus(layer_map=EXTRA),
    "epsilon_plus_flat": lambda: EpsilonPlusFlat(layer_map=EXTRA),
    "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(layer_map=EXTRA),
    "epsilon_alpha2_beta1_flat": lambda: EpsilonAlpha2Beta1Flat(layer_map=EXTRA),
    "epsilon_gamma_box": lambda: EpsilonGammaBox(low=LOW, high=HIGH, layer_map=EXTRA),
    "excitation_backprop": lambda: ExcitationBackprop(),
}


@pytest.fixture
def case(small_net, rng):
    net, path, score = small_net
    images = random_images(rng, net, 2)
    num_classes = net.blobs[score].data[0].size
    classes = rng.integers(0, num_classes, size=(2, 3))
    return net, path, score, images, classes, num_classes


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_composites_match_zennit(case, composite):
    net, path, score, images, classes, num_classes = case
    options = {"low": LOW, "high": HIGH} if composite == "epsilon_gamma_box" else {}
    ours = fastsal.attribute(
        net, images, classes, method="lrp", composite=composite, score=score, reduce="none", **options
    )
    expected = zennit_relevance(
        zennit_model(net, path, score), COMPOSITES[composite](), images, classes, num_classes
    )
    assert_close_per_map(ours, expected)


# Each rule on every convolution and fully connected layer, Pass on the activations, Norm on sums and
# average poolings: (fastsal's rule, zennit's rule).
RULES = {
    "epsilon": (lrp.epsilon(0.01), lambda: Epsilon(0.01)),
    "gamma": (lrp.gamma(0.5), lambda: Gamma(0.5)),
    "alpha_beta": (lrp.alpha_beta(2, 1), lambda: AlphaBeta(2, 1)),
    "alpha1_beta0": (lrp.alpha_beta(1, 0), lambda: AlphaBeta(1, 0)),
    "zplus": (lrp.zplus(), ZPlus),
    "zbox": (lrp.zbox(LOW, HIGH), lambda: ZBox(LOW, HIGH)),
    "flat": (lrp.flat(), Flat),
    "wsquare": (lrp.wsquare(), WSquare),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rules_match_zennit(case, rule):
    net, path, score, images, classes, num_classes = case
    ours_rule, theirs = RULES[rule]
    model = zennit_model(net, path, score)
    names = list(net._layer_names)
    types = {name: net.layers[i].type for i, name in enumerate(names)}
    if rule == "zbox":  # bounds of the input: the layers that read it
        linear = [n for n in names if types[n] in lrp.LINEAR and "data" in net.bottom_names[n]]
    else:
        linear = [n for n in names if types[n] in lrp.LINEAR]
    mapping = {name: ours_rule for name in linear}
    mapping.update({t: "pass" for t in ("ReLU", "PReLU", "Sigmoid", "TanH", "LRN", "Dropout")})
    mapping.update({"Eltwise": "norm", "Pooling": "norm"})
    ours = fastsal.attribute(
        net, images, classes, method="lrp", composite=mapping, score=score, reduce="none"
    )

    def module_name(layer):
        module = model.layers[layer]
        return f"layers.{layer}" + (".1" if isinstance(module, nn.Sequential) else "")

    name_map = [((module_name(n),), theirs()) for n in linear]
    for key, _, _ in model.steps:
        module = model.layers[key]
        if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Sigmoid, nn.Tanh, nn.LocalResponseNorm)):
            name_map.append(((f"layers.{key}",), Pass()))
        if isinstance(module, nn.AvgPool2d):
            name_map.append(((f"layers.{key}",), Norm()))
        if isinstance(module, _StackedSum):
            name_map.append(((f"layers.{key}.sum",), Norm()))
    expected = zennit_relevance(model, NameMapComposite(name_map), images, classes, num_classes)
    assert_close_per_map(ours, expected)


def _big_model(name):
    import caffe

    from fastsal import examples

    photos = examples.open_nsfw_batch()[0][:1]  # 224 x 224 BGR minus the ImageNet mean: both nets' input
    if name == "open_nsfw":
        prototxt, weights = examples.open_nsfw_files()
        return fastsal.load(prototxt, weights), str(prototxt), "fc_nsfw", photos
    prototxt = str(Path(__file__).parent.parent / "bench" / "vgg16_deploy.prototxt")
    caffe.set_random_seed(0)  # seeded weights from Caffe's own fillers, as the benchmarks use
    return caffe.Net(prototxt, caffe.TEST), prototxt, "fc8", photos


MEAN = np.array([104.0, 117.0, 123.0])
BIG = [("open_nsfw", c) for c in sorted(COMPOSITES)] + [
    ("vgg16", "epsilon_gamma_box"),
    ("vgg16", "epsilon_alpha2_beta1_flat"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "composite"), BIG, ids=[f"{n}-{c}" for n, c in BIG])
def test_real_nets_match_zennit(name, composite):
    """Spearman >= 0.999 per map and 99% of values within 1e-3 of the map's max (the float32 forwards of
    Caffe and PyTorch round differently); z-box's bounds: black and white pixels after the mean."""
    net, prototxt, score, images = _big_model(name)
    classes = np.array([[0, 1]])
    low, high = -MEAN, 255 - MEAN
    options = {"low": low, "high": high} if composite == "epsilon_gamma_box" else {}
    ours = fastsal.attribute(
        net, images, classes, method="lrp", composite=composite, score=score, reduce="none", **options
    )
    if composite == "epsilon_gamma_box":
        bounds = [torch.tensor(b, dtype=torch.float32).view(1, 3, 1, 1) for b in (low, high)]
        theirs = EpsilonGammaBox(low=bounds[0], high=bounds[1])
    else:
        theirs = COMPOSITES[composite]()
    expected = zennit_relevance(
        zennit_model(net, prototxt, score), theirs, images, classes, net.blobs[score].data[0].size
    )
    for k in range(classes.shape[1]):
        a, b = ours[0, k], expected[0, k]
        assert spearman(a, b) >= 0.999
        assert np.mean(np.abs(a - b) <= 1e-3 * np.abs(b).max()) >= 0.99


CAPTUM_RULES = ["epsilon", "gamma", "alpha1_beta0"]


@pytest.mark.parametrize("rule", CAPTUM_RULES)
def test_captum_lrp_on_a_sequential_net(tmp_path, rng, rule):
    """Captum's LRP (sequential nets; its relevance starts at the score, so its maps are fastsal's times
    the score). Its gamma and alpha1-beta0 rules keep the bias and one set of weights for every input, so
    they are zennit's where the inputs are >= 0 and the biases 0: pictures in [0, 1], biases zeroed. Its
    pooling layers take its epsilon rule (1e-9): the winner takes all at max pooling, Norm at average."""
    captum_lrp = pytest.importorskip("captum.attr")
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule

    from conftest import NETS, make_net, write

    text, score = NETS["conv_maxpool_fc_softmax"]
    net = make_net(tmp_path, text, seed=5)
    for blobs in net.params.values():
        blobs[1].data[...] = 0
    model = to_torch(net, write(tmp_path, text, "same.prototxt"), score)
    images = rng.uniform(0, 1, (2, 3, 12, 12)).astype(np.float32)
    classes = np.array([[0, 3], [1, 6]])
    conv_rule = {"epsilon": (lrp.epsilon(1e-9), EpsilonRule), "gamma": (lrp.gamma(0.25), GammaRule)}
    conv_rule["alpha1_beta0"] = (lrp.alpha_beta(1, 0), Alpha1_Beta0_Rule)
    ours_rule, theirs_rule = conv_rule[rule]
    composite = {"Convolution": ours_rule, "InnerProduct": lrp.epsilon(1e-9), "ReLU": "pass"}
    composite["Pooling"] = lrp.norm(1e-9)
    ours = fastsal.attribute(
        net, images, classes, method="lrp", composite=composite, score=score, reduce="none"
    )
    columns = []
    for k in range(classes.shape[1]):
        for module in model.modules():  # Captum removes the rules after each call
            if isinstance(module, nn.Conv2d):
                module.rule = theirs_rule()
            elif type(module).__name__ in ("_Flatten", "Softmax"):  # reshapes; the Softmax never runs
                module.rule = EpsilonRule(1e-9)
        x = torch.from_numpy(images.copy()).requires_grad_()
        columns.append(
            captum_lrp.LRP(model).attribute(x, target=torch.from_numpy(classes[:, k])).detach().numpy()
        )
    theirs = np.stack(columns, axis=1)
    scores = model(torch.from_numpy(images)).detach().numpy()[np.arange(2)[:, None], classes]
    assert_close_per_map(ours * scores[:, :, None, None, None], theirs)
