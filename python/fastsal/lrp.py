"""Layer-wise relevance propagation's rules and composites, named and defined as zennit's (0.5.1): a rule says
what a layer's backward computes when relevance flows instead of the gradient; a composite assigns rules
to a Caffe net's layers. The engine runs them (cpp/layers/lrp_rule.hpp); this module resolves them."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import caffe
import numpy as np

# Caffe's activation layers: zennit's composites give activations the Pass rule.
ACTIVATIONS = ("ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "BNLL", "AbsVal", "Threshold", "Swish", "Clip")
# Layers whose relevance passes through unchanged in every composite (fastsal's choice for LRN, which
# zennit leaves to its gradient; Caffe's test-time Dropout is the identity either way).
PASS_THROUGH = ("LRN", "Dropout", "BatchNorm", "Scale")
LINEAR = ("Convolution", "InnerProduct")
COMPOSITES = (
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "excitation_backprop",
)
RULE_NAMES = (
    "epsilon",
    "gamma",
    "alpha_beta",
    "zplus",
    "zbox",
    "flat",
    "wsquare",
    "pass",
    "norm",
    "gradient",
)


@dataclass(frozen=True)
class Rule:
    """One layer's rule; build it with :func:`epsilon`, :func:`gamma`, ... ``stabilizer`` is every
    rule's epsilon in stabilize(z) = z + stabilizer * sign(z) (sign(0) = 1); the epsilon rule's is its
    ``epsilon``."""

    name: str
    epsilon: float = 1e-6
    gamma: float = 0.25
    alpha: float = 2.0
    beta: float = 1.0
    low: object = None
    high: object = None

    def entry(self, layer: str, image_shape) -> tuple:
        """The engine's (layer, rule, epsilon, gamma, alpha, beta, low, high)."""
        low = high = []
        if self.name == "zbox":
            low, high = (_bound(b, name, image_shape) for b, name in ((self.low, "low"), (self.high, "high")))
        return (
            layer,
            self.name,
            float(self.epsilon),
            float(self.gamma),
            float(self.alpha),
            float(self.beta),
            low,
            high,
        )


def _bound(value, name, image_shape) -> list:
    array = np.asarray(value, np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"zbox's {name} must be finite numbers, got {value!r}")
    c = image_shape[0]
    if array.shape == ():
        return [float(array)]
    if array.shape in ((c,), (c, 1, 1)):  # one per channel, as for a mean-subtracted input
        return np.broadcast_to(array.reshape(c, 1, 1), image_shape).astype(np.float32).ravel().tolist()
    if array.shape == tuple(image_shape):
        return array.astype(np.float32).ravel().tolist()
    raise ValueError(
        f"zbox's {name} must be a scalar, one value per channel ({c},) or an image {tuple(image_shape)}, "
        f"got shape {array.shape}"
    )


def _number(name, value, minimum=0.0):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value < minimum
    ):
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def epsilon(epsilon: float = 1e-6) -> Rule:
    """R_i = x_i sum_j w_ji R_j / stabilize_eps(z_j), z = W x + b (LRP-epsilon; epsilon=0: LRP-0)."""
    return Rule("epsilon", epsilon=_number("epsilon", epsilon))


def gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> Rule:
    """zennit's generalised gamma rule, W^+g = W + gamma W^+, W^-g = W + gamma W^- (biases alike): where the
    layer's output z > 0, R_i = x+_i (W^+g^T s)_i + x-_i (W^-g^T s)_i with s = R / stabilize(W^+g x+ + b^+g
    + W^-g x-); where z < 0, the same with W^+g and W^-g swapped."""
    return Rule("gamma", epsilon=_number("stabilizer", stabilizer), gamma=_number("gamma", gamma))


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> Rule:
    """R = alpha (x+ W+^T s+ + x- W-^T s+) - beta (x+ W-^T s- + x- W+^T s-), s+ = R / stabilize(W+ x+ + b+
    + W- x-), s- = R / stabilize(W- x+ + b- + W+ x-); alpha - beta must be 1 (zennit's check)."""
    alpha, beta = _number("alpha", alpha), _number("beta", beta)
    if alpha - beta != 1:
        raise ValueError(f"alpha - beta must be 1 (zennit's AlphaBeta), got alpha={alpha:g}, beta={beta:g}")
    return Rule("alpha_beta", epsilon=_number("stabilizer", stabilizer), alpha=alpha, beta=beta)


def zplus(stabilizer: float = 1e-6) -> Rule:
    """alpha_beta(1, 0): R = x+ W+^T s + x- W-^T s, s = R / stabilize(W+ x+ + b+ + W- x-)."""
    return Rule("zplus", epsilon=_number("stabilizer", stabilizer))


def zbox(low, high, stabilizer: float = 1e-6) -> Rule:
    """For an input in [low, high] (scalars, one value per channel, or image-shaped): R = x W^T s - low W+^T s
    - high W-^T s, s = R / stabilize(W x + b - (W+ low + b+) - (W- high + b-))."""
    # As lists: their repr is exact, so fastsal.attribute's engine cache tells any two bounds apart.
    low, high = (np.asarray(b, np.float64).tolist() for b in (low, high))
    return Rule("zbox", epsilon=_number("stabilizer", stabilizer), low=low, high=high)


def flat(stabilizer: float = 1e-6) -> Rule:
    """Every weight 1, no bias, every input 1: R_i = sum_j R_j / stabilize(fan-in of j) over the outputs
    i feeds."""
    return Rule("flat", epsilon=_number("stabilizer", stabilizer))


def wsquare(stabilizer: float = 1e-6) -> Rule:
    """R_i = sum_j w_ji^2 R_j / stabilize(sum_i' w_ji'^2 + b_j^2)."""
    return Rule("wsquare", epsilon=_number("stabilizer", stabilizer))


def norm(stabilizer: float = 1e-6) -> Rule:
    """zennit's Norm, for an Eltwise SUM or an average pooling: R_i = x_i (A^T (R / stabilize(A x)))_i,
    each input's share in proportion to its contribution (on a max pooling, an Eltwise PROD or MAX: their
    gradient)."""
    return Rule("norm", epsilon=_number("stabilizer", stabilizer))


PASS = Rule("pass")  # relevance unchanged (element-wise layers only)
GRADIENT = Rule("gradient")  # the layer's own gradient (max pooling: the winner takes all)
_BY_NAME = {"epsilon": epsilon, "gamma": gamma, "alpha_beta": alpha_beta, "zplus": zplus, "flat": flat}
_BY_NAME.update(wsquare=wsquare, norm=norm, pass_=lambda: PASS, gradient=lambda: GRADIENT)


def _as_rule(key, value) -> Rule:
    if isinstance(value, Rule):
        return value
    if isinstance(value, str) and value in RULE_NAMES and value != "zbox":
        return _BY_NAME["pass_" if value == "pass" else value]()
    raise ValueError(
        f"composite[{key!r}] must be a fastsal.lrp rule (epsilon(), gamma(), alpha_beta(), zplus(), zbox(low, "
        f"high), flat(), wsquare(), norm(), PASS, GRADIENT) or one of their names, got {value!r}"
    )


def check_options(options: dict) -> dict:
    """Attribution's checks of method="lrp"'s options (composite, epsilon, gamma, stabilizer, low, high)."""
    composite = options["composite"]
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            raise ValueError(
                f"unknown composite {composite!r}; fastsal has: {', '.join(COMPOSITES)}, or a mapping"
            )
    elif isinstance(composite, Mapping):
        for key, value in composite.items():
            if not isinstance(key, str):
                raise TypeError(f"composite's keys must be layer names or types (str), got {key!r}")
            _as_rule(key, value)
    else:
        raise TypeError(
            f"composite must be a name or a mapping of layer names or types to rules, got {composite!r}"
        )
    for name in ("epsilon", "gamma", "stabilizer"):
        _number(name, options[name])
    if composite == "epsilon_gamma_box" and (options["low"] is None or options["high"] is None):
        raise ValueError(
            "composite 'epsilon_gamma_box' needs low= and high=, the input's valid range after preprocessing "
            "(scalars, one value per channel, or image-shaped)"
        )
    return options


def _composite_rules(composite: str, layer_type: str, first: bool, options) -> Rule:
    eps, stab = options["epsilon"], options["stabilizer"]
    if composite == "excitation_backprop":
        if layer_type in LINEAR:
            return zplus(stab)
    elif layer_type in LINEAR:
        if first and composite.endswith("_flat"):
            return flat(stab)
        if layer_type == "InnerProduct":
            return epsilon(eps)
        if first and composite == "epsilon_gamma_box":
            return zbox(options["low"], options["high"], stab)
        if composite == "epsilon_gamma_box":
            return gamma(options["gamma"], stab)
        if composite.startswith("epsilon_plus"):
            return zplus(stab)
        return alpha_beta(2.0, 1.0, stab)
    elif layer_type in ACTIVATIONS or layer_type in PASS_THROUGH:
        return PASS
    if layer_type in ("Eltwise", "Pooling"):  # the engine applies Norm to sums and averages only
        return norm(stab)
    return GRADIENT


def layer_rules(net: caffe.Net, options: dict, image_shape) -> list[tuple]:
    """The engine's rule table: one entry per layer of ``net`` that does not keep its gradient."""
    composite = options["composite"]
    rules = []
    seen_first = False
    names = list(net._layer_names)
    for index, name in enumerate(names):
        layer_type = net.layers[index].type
        if isinstance(composite, str):
            first_types = ("Convolution",) if composite == "epsilon_gamma_box" else LINEAR
            first = (
                not seen_first
                and composite in ("epsilon_gamma_box",) + tuple(c for c in COMPOSITES if c.endswith("_flat"))
                and layer_type in first_types
            )
            seen_first = seen_first or first
            rule = _composite_rules(composite, layer_type, first, options)
        else:
            value = composite.get(name, composite.get(layer_type))
            rule = GRADIENT if value is None else _as_rule(name if name in composite else layer_type, value)
        _check_fits(net, name, layer_type, rule)
        if rule.name != "gradient":
            rules.append(rule.entry(name, image_shape))
    if isinstance(composite, Mapping):
        # A type the net lacks is fine (one mapping serves several nets); a name that is neither is a typo.
        unknown = sorted(set(composite) - set(names) - set(caffe.layer_type_list()))
        if unknown:
            raise ValueError(
                f"composite names no layer of the net nor a Caffe layer type: {', '.join(map(repr, unknown))}"
            )
    return rules


def _check_fits(net, name, layer_type, rule: Rule) -> None:
    kind = rule.name
    if kind == "gradient":
        return
    if kind in ("epsilon", "gamma", "alpha_beta", "zplus", "zbox", "flat", "wsquare"):
        fits = layer_type in LINEAR and len(net.bottom_names[name]) == 1
    elif kind == "norm":
        fits = layer_type in ("Eltwise", "Pooling")
    else:  # pass: one input, one output of its shape
        bottoms, tops = net.bottom_names[name], net.top_names[name]
        fits = (
            len(bottoms) == 1
            and len(tops) == 1
            and net.blobs[bottoms[0]].data.shape == net.blobs[tops[0]].data.shape
        )
    if not fits:
        what = {
            "norm": "an Eltwise SUM or an average pooling",
            "pass": "a one-input layer that keeps its shape",
        }
        raise ValueError(
            f"layer '{name}' ({layer_type}) cannot take rule {kind!r}; it is for "
            + what.get(kind, "a Convolution or InnerProduct with one input")
        )
