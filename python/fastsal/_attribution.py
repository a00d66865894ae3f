"""The gradient attribution family on the batched engine: each method is a choice of input rows (noise
samples, integration steps), weights, an accumulation, a multiplier and a channel reduction, or a
gradient taken at a layer blob (Grad-CAM), or a backward rule (guided backprop, deconvnet, DeepLIFT)."""

from __future__ import annotations

import hashlib
import numbers
import threading
import weakref

import caffe
import numpy as np

from . import _core, lrp
from ._forward import Forward
from ._perturbation import ablationcam, occlusion, occlusion_windows, rise, scorecam
from ._resample import upsample
from ._saliency import Saliency, _check_blob_name, _check_net, _check_positive_int, batch_slices
from ._threads import check_threads

METHODS = (
    "saliency",
    "input_x_gradient",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "integrated_gradients",
    "gradcam",
    "gradcam++",
    "guided_backprop",
    "deconvnet",
    "guided_gradcam",
    "occlusion",
    "rise",
    "scorecam",
    "ablationcam",
    "lrp",
    "deeplift",
)
BASELINE_METHODS = ("integrated_gradients", "deeplift")  # gradients against a reference: a convergence delta
PERTURBATION_METHODS = ("occlusion", "rise", "scorecam", "ablationcam")  # forward passes only
NOISE_METHODS = {"smoothgrad": "sum", "smoothgrad_sq": "squares", "vargrad": "variance"}
CAM_METHODS = ("gradcam", "gradcam++")
RULES = {"guided_backprop": "guided", "deconvnet": "deconvnet", "guided_gradcam": "guided"}
QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
REDUCTIONS = ("absmax", "sum", "none")
OCCLUSION_REDUCTIONS = ("mean", *REDUCTIONS)
UPSAMPLING = ("bilinear", "nearest")
LAYER_METHODS = ("gradcam", "gradcam++", "guided_gradcam", "scorecam", "ablationcam")

FLOAT32_MAX = float(np.finfo(np.float32).max)

# The options each method takes, with their defaults (Captum's and PAIR's, see Attribution).
_OPTIONS = {
    "saliency": {"reduce": "absmax"},
    "input_x_gradient": {"reduce": "absmax"},
    "integrated_gradients": {
        "reduce": "absmax",
        "n_steps": 50,
        "quadrature": "gausslegendre",
        "baselines": 0.0,
    },
    "gradcam": {"layer": None, "relu": True, "upsample": "bilinear"},
    "gradcam++": {"layer": None, "relu": True, "upsample": "bilinear"},
    "guided_backprop": {"reduce": "absmax"},
    "deconvnet": {"reduce": "absmax"},
    "guided_gradcam": {"reduce": "absmax", "layer": None, "upsample": "bilinear"},
    "occlusion": {"sliding_window_shapes": None, "strides": None, "baselines": 0.0, "reduce": "mean"},
    "rise": {"n_masks": 4000, "grid_size": 8, "p1": 0.5, "seed": None, "probabilities": True},
    "scorecam": {"layer": None, "upsample": "bilinear", "normalize": True},
    "ablationcam": {"layer": None, "upsample": "bilinear", "normalize": True},
    "deeplift": {"reduce": "absmax", "baselines": 0.0},
    "lrp": {"composite": "epsilon_plus", "reduce": "sum", "epsilon": 1e-6, "gamma": 0.25, "stabilizer": 1e-6}
    | {"low": None, "high": None},
}
for _name in NOISE_METHODS:
    _OPTIONS[_name] = {"reduce": "absmax", "samples": 25, "stdev": None, "noise_level": None, "seed": None}


def integration_points(n_steps: int, quadrature: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of Captum's integral approximations of int_0^1 f(alpha) d alpha."""
    if quadrature == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    if n_steps < 2:
        raise ValueError(f"n_steps must be at least 2 for {quadrature}, got {n_steps}")
    n = n_steps
    weights = np.full(n, 1.0 / n)
    rule = quadrature.split("_")[1]
    if rule == "trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = np.linspace(0, 1, n)
    elif rule == "left":
        alphas = np.linspace(0, 1 - 1 / n, n)
    elif rule == "middle":
        alphas = np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    else:
        alphas = np.linspace(1 / n, 1, n)
    return alphas, weights


def default_cam_layer(net: caffe.Net, score: str) -> str:
    """The last blob before the score, on its path, that is 4-D with more than one pixel. Only tops
    that feed the score count (a Slice's other part does not), and never a Split's copy: its gradient
    would miss the other branches, so the blob the Split copies is taken instead."""
    layers = list(net._layer_names)
    producers = [name for name in layers if score in net.top_names[name]]
    needed = {score}
    for index in reversed(range(layers.index(producers[-1]) + 1)):
        name = layers[index]
        tops = [top for top in net.top_names[name] if top in needed]
        if not tops:
            continue
        if net.layers[index].type != "Split":
            for top in tops:
                shape = net.blobs[top].shape
                if top != score and len(shape) == 4 and shape[2] * shape[3] > 1:
                    return top
        needed.update(net.bottom_names[name])
    raise ValueError(f"no 4-D blob with a spatial extent feeds score blob '{score}'; name one with layer=")


class Attribution:
    """An attribution method for one ``caffe.Net``, reusable across calls, on fastsal's batched engine.

    Every method differentiates the class scores (``score``) like :class:`Saliency`, keeps memory
    bounded by ``batch_size`` rows however many images, classes, samples or steps, and returns
    (N, K, H, W) float32 maps (one (C, H, W) image: (K, H, W)); ``reduce="none"`` returns the raw
    (N, K, C, H, W) values, numerically comparable to Captum's output. Noise samples and integration
    steps go through the batch: one forward per sample and one data-only backward per (sample, class).

    Methods and their options (defaults are Captum's, and PAIR's for the noise):

    - ``"saliency"``: the gradient (Simonyan et al. 2013; Captum ``Saliency(abs=False)`` before the
      reduction). ``reduce``: ``"absmax"`` (max over channels of |a|, the default), ``"sum"`` (sum
      over channels, as Captum's visualisation does) or ``"none"``.
    - ``"input_x_gradient"``: input times gradient (Captum ``InputXGradient``). ``reduce``.
    - ``"smoothgrad"``, ``"smoothgrad_sq"``, ``"vargrad"``: Captum ``NoiseTunnel`` over the gradient:
      the mean of a, the mean of a^2, the biased variance, over ``samples`` (25) noisy copies, each
      x + N(0, sigma^2) with sigma = ``stdev`` (absolute) or ``noise_level`` * (max - min of the
      image) (default noise_level 0.15). ``seed`` makes the noise reproducible: the noise of image n
      comes from ``numpy.random.default_rng([seed, n])``, so a seed gives the same maps whatever the
      batch size. ``reduce`` is applied after the samples are combined.
    - ``"integrated_gradients"``: Captum ``IntegratedGradients``: (x - baseline) times the integral
      of the gradient along the straight path, ``n_steps`` (50) points of ``quadrature``
      (``"gausslegendre"``, or ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``,
      ``"riemann_trapezoid"``; Captum's ``method=``), ``baselines`` a scalar, one value per channel
      ((C,) or (C, 1, 1)) or an image-shaped array ((C, H, W) or (N, C, H, W)). ``compute(..., return_convergence_delta=True)`` also returns
      sum(attributions) - (F(x) - F(baseline)) per (image, class).
    - ``"gradcam"``, ``"gradcam++"``: at the blob ``layer`` (default: the last 4-D blob with more than
      one pixel before the score). Grad-CAM's weights are the spatial mean of the blob's gradient
      (Captum ``LayerGradCam``); Grad-CAM++'s are pytorch-grad-cam's. The map is ReLU of the weighted
      sum of the blob's channels (``relu=False``: Captum's signed LayerGradCam), upsampled to the
      input size (``upsample="bilinear"``, ``"nearest"`` (Captum's GuidedGradCam), or False: the
      layer's h x w). The blob is taken as ``net.blobs`` shows it after a forward pass: with an
      in-place ReLU on it, its values after the ReLU and the gradient with respect to them, as a
      PyTorch hook on the ReLU's output sees it.
    - ``"guided_backprop"``, ``"deconvnet"``: the backward of every plain ReLU replaced, in fastsal's
      own net only, by g * (x > 0) * (g > 0) or g * (g > 0) (Captum ``GuidedBackprop``,
      ``Deconvolution``). Leaky ReLU (``negative_slope``), PReLU, Sigmoid, TanH and every other layer
      keep their gradient, as Captum leaves every module but nn.ReLU alone. ``reduce``.
    - ``"guided_gradcam"``: guided backprop times the upsampled Grad-CAM at ``layer``, per channel
      (Captum ``GuidedGradCam``), then ``reduce``. ``layer``, ``upsample``.

    - ``"lrp"``: layer-wise relevance propagation, rule by rule as zennit 0.5.1 defines them (formulas:
      :mod:`fastsal.lrp`). Relevance flows as the diff, from the one-hot of each class at the score
      (below the Softmax), as zennit's attributors start it; Captum's ``LRP`` starts at the score
      itself, so its maps are these times each (image, class)'s score. ``composite``: a name,
      zennit's composite of the same name (``"epsilon_plus"``, the default: z+ on convolutions,
      epsilon on fully connected layers; ``"epsilon_plus_flat"``, ``"epsilon_alpha2_beta1"``,
      ``"epsilon_alpha2_beta1_flat"``: the first linear layer flat; ``"epsilon_gamma_box"``: z-box on
      the first convolution with bounds ``low``/``high`` (scalars, one per channel, or image-shaped:
      the preprocessed values of black and white pixels, ``Preprocessing.valid_range()``), gamma on
      convolutions; ``"excitation_backprop"``: z+ on every linear layer, ReLU keeps its gradient), or
      a mapping from layer names or types to rules (``fastsal.lrp.epsilon(0.1)``, ``"zplus"``,
      ``"pass"``, ...; a name wins over a type; unmapped layers keep their gradient). The named
      composites pass relevance through activations, LRN, Dropout and BatchNorm, and split it by
      zennit's Norm at Eltwise sums and average poolings; max pooling is the gradient (winner takes
      all). A BatchNorm (+ Scale) applied in place after a convolution with a rule is merged into its
      weights, as zennit's canonizer merges it. ``epsilon`` (1e-6), ``gamma`` (0.25), ``stabilizer``
      (1e-6) as zennit's. ``reduce``: ``"sum"`` by default (relevance is signed and conserved).
      CPU only: ``device=`` is refused. One forward per batch serves all K classes, the rules'
      modified weights are built once per engine (:meth:`reload_weights` rebuilds them).
    - ``"deeplift"``: DeepLIFT's Rescale rule (Shrikumar et al. 2017), Captum ``DeepLift``
      semantics: attributions (x - x0) * m, x0 the baseline (``baselines`` as for integrated
      gradients: a scalar, one value per channel ((C,) or (C, 1, 1)), a (C, H, W) image, or one
      image per image; default 0), m the gradient of the class score (pre-softmax, as every method here)
      with each nonlinearity's derivative replaced by its multiplier: for ReLU (leaky too), Sigmoid,
      TanH and ELU, (f(x) - f(x0)) / (x - x0) at each element, f'(x) where |x - x0| < 1e-10 (Captum's
      eps); for a max pooling, Captum's rule: per window, y and r the maxima of x and of x0, y - r goes
      to x's maximum where y >= r, else to x0's, and each input's sum is divided by its x - x0 (the
      gradient where |x - x0| < 1e-10). Linear layers (convolution, inner product, BatchNorm and Scale
      in test mode, Eltwise SUM, average pooling, Split, Concat, Slice, Dropout, Flatten, Reshape) keep
      their gradient; any other layer (LRN, PReLU, Eltwise PROD/MAX, ...) is refused with a
      ValueError naming it. Each batch's baselines are forwarded, then its images, and the K
      classes' backwards share that pair of forwards. ``compute(..., return_convergence_delta=True)``
      returns sum(attributions) - (F(x) - F(x0)) per (image, class), as Captum's. ``reduce``
      (``"absmax"`` by default, as integrated gradients'). Where Captum 0.9.0 differs, at max
      poolings only: its hooks lose the pooling's rule where a nonlinearity feeds the pooling directly
      (captum#1104), and where overlapping windows share their maximum its max_unpool keeps one
      window's share; fastsal applies the rule as stated (sums, as the gradient does), so completeness
      holds, and ``fastsal.torch_port`` has the two fixes that make Captum agree. Captum also carries the
      baseline's own backward, which differs only where a pooling's input equals its reference exactly
      (a ReLU below zeroes that). CPU only: ``device=`` is refused.

    Perturbation methods need no gradient: forward passes only, one forward serving every class of an
    image (so K classes cost what one does), through an internal net built without force_backward.

    - ``"occlusion"``: Captum ``Occlusion``: each ``sliding_window_shapes`` window ((h, w) over every
      channel, or (c, h, w); default 15 x 15, or the image's size where smaller) at ``strides`` (an
      int or one per axis; default 8, or the window where smaller) set to ``baselines`` (a scalar or an image-shaped array, as for integrated gradients; default 0); an
      element's attribution is the mean over the windows covering it of f(x) - f(occluded x).
      ``reduce``: ``"mean"`` over channels (the default: windows over every channel give every
      channel the same value), ``"sum"``, ``"absmax"`` or ``"none"`` (Captum's (C, H, W) values).
    - ``"rise"``: RISE (Petsiuk et al. 2018): ``n_masks`` (4000) random masks, each a ``grid_size``
      (8) square grid of cells kept with probability ``p1`` (0.5), upsampled bilinearly and shifted
      by a random offset within a cell (RISE's own generate_masks); the map of class c is
      sum_i p_c(M_i x) M_i / (n_masks p1), p_c the softmax of the scores (``probabilities=False``: the
      scores). The same masks serve every image; ``seed`` (default: drawn per call) makes them
      reproducible: mask i comes from ``numpy.random.default_rng([seed, i])``.
    - ``"scorecam"``: Score-CAM (Wang et al. 2020) at ``layer`` (as Grad-CAM's), with
      pytorch-grad-cam's semantics: each channel of the layer, upsampled to the input (bilinear,
      align_corners=True) and scaled to [0, 1], masks the input; the channels' weights are the
      softmax over channels of the masked inputs' class scores; the map is ReLU of the weighted sum,
      upsampled (``upsample``) and, with ``normalize`` (default), scaled to [0, 1] per map as
      pytorch-grad-cam's output is.
    - ``"ablationcam"``: Ablation-CAM (Desai and Ramaswamy 2020) at ``layer``, with
      pytorch-grad-cam's semantics: each channel of the layer ablated in turn (set to 0 when the
      activations' minimum is 0, as after a ReLU, else to that minimum minus 1e7), channel c weighted
      by (y - y_c) / y, y the class score and y_c the score with c ablated; then as Score-CAM. The
      ablated forwards start at the layer (the layers below it run once per image), so ``layer``
      must be a blob every later layer depends on alone (a block's output, not a residual branch).

    Classes take every form :meth:`Saliency.compute` takes; :meth:`compute_top_k` ranks each image's
    classes once, on the clean image. ``score``, ``input``, ``batch_size``, ``fast_layers``,
    ``exact``, ``device`` and ``threads`` mean what they mean for :class:`Saliency`.
    """

    def __init__(
        self,
        net: caffe.Net,
        method: str = "saliency",
        *,
        score: str | None = None,
        input: str | None = None,  # noqa: A002 - the user's word for it
        batch_size: int | None = None,
        fast_layers: bool = True,
        exact: bool = True,
        device: int | None = None,
        threads: int | None = None,
        _bf16_backward: bool = True,
        _bf16_forward: bool = True,
        _blocked_layouts: bool = True,
        **options,
    ):
        _check_net(net)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; fastsal has: {', '.join(METHODS)}")
        self.method = method
        self.options = self._check_options(method, options)
        engine = dict(
            score=score,
            input=input,
            batch_size=batch_size,
            fast_layers=fast_layers,
            exact=exact,
            device=device,
            threads=threads,
            _bf16_backward=_bf16_backward,
            _blocked_layouts=_blocked_layouts,
        )
        # The input gradient's engine, with the method's ReLU rule; Grad-CAM's at its layer; the
        # perturbation methods' forward-only one.
        self._input = self._cam = self._forward = None
        layer = self._layer_blob(net, score) if method in LAYER_METHODS else None
        if method in PERTURBATION_METHODS:
            self._forward = Forward(net, layer=layer, **engine, _bf16_forward=_bf16_forward)
            self._check_layer_shape(layer, self._forward._engine)
            if method == "ablationcam":  # refuses a layer a later layer bypasses, before any work
                self._forward.stream(0, None, None, from_layer=True)
        elif method == "lrp":
            self._input = lrp_engine(net, engine, self.options)
        elif method == "deeplift":
            self._input = deeplift_engine(net, engine)
        elif method not in CAM_METHODS:
            self._input = Saliency(net, **engine, _relu_rule=RULES.get(method, "gradient"))
        if method in CAM_METHODS or method == "guided_gradcam":
            self._cam = Saliency(net, **engine, _gradient_blob=layer)
            self._check_layer_shape(layer, self._cam)
        if method == "occlusion":
            self._baselines = self._check_baselines(self.options["baselines"])
            occlusion_windows(
                self.image_shape, self.options["sliding_window_shapes"], self.options["strides"]
            )
        if method in BASELINE_METHODS:
            self._baselines = self._check_baselines(self.options["baselines"])
        if method == "integrated_gradients":
            # Once: Gauss-Legendre's nodes come from an n_steps x n_steps eigenproblem.
            alphas, weights = integration_points(self.options["n_steps"], self.options["quadrature"])
            self._points = alphas.astype(np.float32), weights.astype(np.float32)

    def _layer_blob(self, net, score) -> str:
        """The CAM family's ``layer`` option, or its default: the last 4-D blob before the score."""
        layer = self.options["layer"]
        if not layer:
            _check_blob_name("score", score)
            if score is not None:
                _core.check_blob(net, score, "score")  # before the search, which assumes it exists
            layer = default_cam_layer(net, score or _core.default_score_blob(net))
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a blob name (str), got {type(layer).__name__}")
        return layer

    def _check_layer_shape(self, layer, engine: Saliency) -> None:
        if layer is None:
            return
        name = {"scorecam": "Score-CAM", "ablationcam": "Ablation-CAM"}.get(self.method, "Grad-CAM")
        if layer == engine.input:
            raise ValueError(
                f"layer blob '{layer}' is the input blob itself; {name} needs a blob between input "
                f"blob '{layer}' and score blob '{engine.score}'"
            )
        if len(engine._engine.gradient_shape) != 3:
            raise ValueError(
                f"layer blob '{layer}' has shape {tuple(engine._engine.gradient_shape)} per image; "
                f"{name} needs a 4-D (N, C, H, W) blob"
            )
        if self.method in PERTURBATION_METHODS and np.prod(engine._engine.gradient_shape[1:]) == 1:
            raise ValueError(
                f"layer blob '{layer}' has one pixel per channel: {name}'s maps would be constant "
                "(its masks and ablations need a spatial extent); choose an earlier blob"
            )

    @property
    def _main(self) -> Saliency:
        return self._input or self._cam or self._forward._engine

    @property
    def num_classes(self) -> int:
        return self._main.num_classes

    @property
    def threads(self) -> int:
        """CPU threads this method's engines use."""
        return self._main.threads

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self._main.image_shape

    @property
    def layer(self) -> str | None:
        """The blob Grad-CAM is computed at (None for methods without one)."""
        if self.method not in LAYER_METHODS:
            return None
        return (self._cam or self._forward._engine)._engine.gradient_blob

    @staticmethod
    def _check_options(method: str, options: dict) -> dict:
        known = _OPTIONS[method]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"method {method!r} takes no option {', '.join(map(repr, unknown))}; its options are: "
                + (", ".join(known) or "none")
            )
        merged = {**known, **options}
        reductions = OCCLUSION_REDUCTIONS if method == "occlusion" else REDUCTIONS
        if "reduce" in merged and merged["reduce"] not in reductions:
            raise ValueError(f"reduce must be one of {', '.join(reductions)}, got {merged['reduce']!r}")
        for name in ("n_masks", "grid_size"):
            if name in merged:
                _check_positive_int(name, merged[name])
        if "p1" in merged and (
            isinstance(merged["p1"], bool)
            or not isinstance(merged["p1"], numbers.Real)
            or not 0 < merged["p1"] <= 1
        ):
            raise ValueError(
                f"p1 (the probability of keeping a cell) must be in (0, 1], got {merged['p1']!r}"
            )
        for name in ("probabilities", "normalize"):
            if name in merged and not isinstance(merged[name], bool):
                raise TypeError(f"{name} must be True or False, got {merged[name]!r}")
        if "samples" in merged:
            _check_positive_int("samples", merged["samples"])
            stdev, level = merged["stdev"], merged["noise_level"]
            if stdev is not None and level is not None:
                raise ValueError("give stdev (absolute) or noise_level (relative to max - min), not both")
            for name, value in (("stdev", stdev), ("noise_level", level)):
                if value is not None and (
                    isinstance(value, bool)
                    or not isinstance(value, numbers.Real)
                    or not 0 <= value <= FLOAT32_MAX
                ):
                    raise ValueError(f"{name} must be a number >= 0 that float32 can hold, got {value!r}")
            if stdev is None and level is None:
                merged["noise_level"] = 0.15
        if "seed" in merged:
            seed = merged["seed"]
            if seed is not None and (
                isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
            ):
                raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        if "n_steps" in merged:
            _check_positive_int("n_steps", merged["n_steps"])
            if merged["quadrature"] not in QUADRATURES:
                raise ValueError(
                    f"quadrature must be one of {', '.join(QUADRATURES)}, got {merged['quadrature']!r}"
                )
            integration_points(merged["n_steps"], merged["quadrature"])  # raises for riemann with 1 step
        if "upsample" in merged and merged["upsample"] is not False and merged["upsample"] not in UPSAMPLING:
            raise ValueError(f"upsample must be 'bilinear', 'nearest' or False, got {merged['upsample']!r}")
        if method == "guided_gradcam" and merged["upsample"] is False:
            raise ValueError("guided_gradcam multiplies by the input-sized map: upsample cannot be False")
        if "relu" in merged and not isinstance(merged["relu"], bool):
            raise TypeError(f"relu must be True or False, got {merged['relu']!r}")
        return lrp.check_options(merged) if method == "lrp" else merged

    def _check_baselines(self, baselines) -> np.ndarray:
        array = np.asarray(baselines)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise TypeError(f"baselines must hold real numbers, got dtype {array.dtype}")
        shape = self.image_shape
        if array.shape in ((shape[0],), (shape[0], 1, 1)):  # one value per channel, kept so: any image size
            array = array.reshape(shape[0], 1, 1)
        if array.shape not in ((), shape, (shape[0], 1, 1)) and not (
            array.ndim == 4 and array.shape[1:] == shape
        ):
            raise ValueError(
                f"baselines must be a scalar, one value per channel ({shape[0]},), a {shape} image or an "
                f"(N, *{shape}) array, got shape {array.shape}"
            )
        if not np.isfinite(array.astype(np.float32)).all():
            raise ValueError("baselines contain NaN or Inf once converted to float32")
        return array.astype(np.float32)

    # ---- computing ----

    def compute(self, images, classes, *, return_convergence_delta: bool = False):
        """Attributions of ``images`` for ``classes`` (an int, a sequence of K ints, or an (N, K) array:
        see :meth:`Saliency.compute`). Returns (N, K, H, W) maps, (N, K, C, H, W) with
        ``reduce="none"``; one (C, H, W) image drops the N axis. With ``return_convergence_delta``
        (integrated_gradients, deeplift): ``(maps, delta)``, delta (N, K)."""
        self._refresh()
        batch, single = self._main._images(images)
        ids = self._main._classes(classes, len(batch))
        maps, _, _, delta = self._run(batch, ids, None, return_convergence_delta)
        result = (maps, delta) if return_convergence_delta else (maps,)
        result = tuple(r[0] for r in result) if single else result
        return result if return_convergence_delta else result[0]

    def compute_top_k(self, images, k: int = 1, *, return_convergence_delta: bool = False):
        """Attributions for each image's ``k`` best classes, ranked once on the clean image (ties: the
        lower id first). Returns ``(maps, classes)`` (plus delta with ``return_convergence_delta``)."""
        self._refresh()
        self._check_k(k)
        batch, single = self._main._images(images)
        maps, classes, _, delta = self._run(batch, None, k, return_convergence_delta)
        result = (maps, classes, delta) if return_convergence_delta else (maps, classes)
        return tuple(r[0] for r in result) if single else result

    def explain(
        self, images, classes=None, k: int | None = None, *, image_ids=None, return_convergence_delta=False
    ):
        """``(maps, classes, scores)`` for a batch in one go, for jobs: classes given ((N, K) or any form
        of :meth:`compute`) or each image's top ``k``; scores (N, num_classes) of the clean images, taken
        from the attribution's own forward pass where it has one. ``image_ids`` (N ints): each image's
        index in the whole job, which keys its noise (default 0..N-1, as :meth:`compute` keys it).
        ``return_convergence_delta`` (integrated_gradients, deeplift): the (N, K) delta of :meth:`compute` too."""
        self._refresh()
        batch, _ = self._main._images(images)
        ids = None if classes is None else self._main._classes(classes, len(batch))
        if ids is None:
            self._check_k(k)
        if image_ids is not None:
            image_ids = np.asarray(image_ids, np.int64)
            if image_ids.shape != (len(batch),):
                raise ValueError(
                    f"image_ids must hold one id per image ({len(batch)}), got shape {image_ids.shape}"
                )
        maps, classes, scores, delta = self._run(
            batch, ids, k, return_convergence_delta, want_scores=True, image_ids=image_ids
        )
        return (maps, classes, scores, delta) if return_convergence_delta else (maps, classes, scores)

    def _check_k(self, k) -> None:
        """Every method refuses a top k beyond the classes, as :meth:`Saliency.compute_top_k` does."""
        _check_positive_int("k", k)
        if k > self.num_classes:
            raise ValueError(
                f"k={k} exceeds the {self.num_classes} classes of score blob '{self._main.score}'"
            )

    def _refresh(self) -> None:
        for engine in (self._input, self._cam, self._forward and self._forward._engine):
            if engine:
                engine._refresh()

    def reload_weights(self) -> None:
        """Call after writing ``net``'s weights in place (``net.params[name][i].data[...] = ...``): what
        the engines built from them (LRP's modified weights) is rebuilt, so the next maps are those of a
        new Attribution. Every other method reads the weights at each pass."""
        for engine in (self._input, self._cam, self._forward and self._forward._engine):
            if engine:
                engine.reload_weights()

    def scores(self, images) -> np.ndarray:
        """The score blob's values, (N, num_classes) float32: forward passes only, through the net as it
        is now (after ``net.reshape()`` or ``net.share_with()``, as :meth:`compute`)."""
        self._refresh()
        batch, single = self._main._images(images)
        out = self._scores(batch)
        return out[0] if single else out

    def _scores(self, batch: np.ndarray) -> np.ndarray:
        return self._main._scores(batch)

    def _run(self, images: np.ndarray, classes, k, delta: bool, want_scores: bool = False, image_ids=None):
        """(maps, classes (N, K) int64, scores or None, delta or None). classes None: each image's top k,
        ranked on the clean image: by the attribution's own forward when it has one sample per image."""
        method, options = self.method, self.options
        if delta and method not in BASELINE_METHODS:
            raise ValueError(
                "return_convergence_delta is for method='integrated_gradients' or 'deeplift' only"
            )
        if method in BASELINE_METHODS:
            self._check_baselines_fit(len(images))
        scores = None
        if method in PERTURBATION_METHODS:
            return (*self._perturb(images, classes, k), None)
        if method in NOISE_METHODS or method == "integrated_gradients":
            if classes is None or want_scores:
                scores = self._scores(images)
            if classes is None:
                classes = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            want_scores = False
        if method in CAM_METHODS or method == "guided_gradcam":
            mode = options["upsample"] if method in CAM_METHODS else options["upsample"] or "bilinear"
            cams, classes, scores = self._cams(images, classes, k, want_scores, mode)
            if method in CAM_METHODS:
                return cams, classes, scores, None
            raw, _, _ = self._gradients(images, classes, "none")
            return _reduce(raw * cams[:, :, None], options["reduce"]), classes, scores, None
        reduce = options["reduce"]
        if method in BASELINE_METHODS and delta:  # deeplift ranks its top k in its own forward
            raw, classes, own_scores = self._gradients(images, classes, "none", k, want_scores, image_ids)
            scores = own_scores if scores is None else scores
            return _reduce(raw, reduce), classes, scores, self._convergence_delta(images, classes, raw)
        maps, classes, own_scores = self._gradients(images, classes, reduce, k, want_scores, image_ids)
        return maps, classes, own_scores if scores is None else scores, None

    def _perturb(self, images: np.ndarray, classes, k):
        """(maps, classes, clean scores) of a perturbation method; classes None: each image's top k."""
        clean = self._forward.scores(images)
        if classes is None:
            classes = np.argsort(-clean, axis=1, kind="stable")[:, :k]
        classes = np.asarray(classes, np.int64)
        options = dict(self.options)
        if self.method == "occlusion":
            self._check_baselines_fit(len(images))
            raw = occlusion(self._forward, images, classes, clean, self._baselines, options)
            maps = (
                raw.mean(axis=2, dtype=np.float32)
                if options["reduce"] == "mean"
                else _reduce(raw, options["reduce"])
            )
        else:
            if self.method == "rise" and options["seed"] is None:
                options["seed"] = int(np.random.SeedSequence().entropy % 2**63)
            maps = {"rise": rise, "scorecam": scorecam, "ablationcam": ablationcam}[self.method](
                self._forward, images, classes, options
            )
        return maps, classes, clean

    def _targets(self, n: int, classes, k, want_scores: bool):
        """The engine's side of the classes for one call: (classes as int32 or None, K, the (N, K) array
        the engine ranks into when classes is None, the (N, num_classes) scores array if wanted)."""
        k = k if classes is None else classes.shape[1]
        classes = None if classes is None else np.ascontiguousarray(classes, dtype=np.int32)
        top = np.empty((n, k), np.int32) if classes is None else None
        scores = np.empty((n, self.num_classes), np.float32) if want_scores else None
        return classes, k, top, scores

    def _gradients(
        self,
        images: np.ndarray,
        classes,
        reduce: str,
        k: int | None = None,
        want_scores: bool = False,
        image_ids=None,
    ):
        """The input-gradient methods, streamed in chunks of whole images through the engine:
        (out, classes, scores or None); classes None ranks each image's top k in the engine. The noise
        of image i comes from ``default_rng([seed, image_ids[i]])`` (ids default to 0..N-1)."""
        method, options = self.method, self.options
        saliency = self._input
        c, h, w = self.image_shape
        n = len(images)
        classes, k, top, scores = self._targets(n, classes, k, want_scores)
        out = np.empty((n, k, c, h, w) if reduce == "none" else (n, k, h, w), np.float32)
        samples = options.get("samples", options.get("n_steps", 1))
        batch = saliency.batch_size
        chunk = max(1, batch // samples)  # images per engine call: rows stay near batch_size
        seed = options.get("seed")
        if method in NOISE_METHODS and seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        for part in batch_slices(n, chunk):
            start = part.start
            x = np.ascontiguousarray(images[part], dtype=np.float32)
            call = dict(reduce=reduce, first_index=start)
            rows = weights = None  # rows(first, count): those samples of every image in x
            if method == "input_x_gradient":
                call.update(multiplier=x)
            elif method in NOISE_METHODS:
                sigmas, generators = [], []
                for i, image in enumerate(x):
                    sigma = options["stdev"]
                    if sigma is None:
                        spread = float(image.max()) - float(image.min())
                        sigma = options["noise_level"] * spread
                        if sigma > FLOAT32_MAX:
                            raise ValueError(
                                f"noise_level={options['noise_level']!r} times the range of images[{start + i}] "
                                f"({spread:g}) gives a noise stdev of {sigma:g}, beyond float32; give a "
                                "smaller noise_level"
                            )
                    sigmas.append(np.float32(sigma))
                    key = start + i if image_ids is None else int(image_ids[start + i])
                    generators.append(np.random.default_rng([seed, key]))

                def rows(first, count, start=start, x=x, sigmas=sigmas, generators=generators):
                    # Each image's generator is drawn in order, so the noise does not depend on the split.
                    with np.errstate(over="ignore"):  # an overflow is refused just below, naming the option
                        noisy = np.stack(
                            [
                                image + sigma * rng.standard_normal((count, c, h, w), np.float32)
                                for image, sigma, rng in zip(x, sigmas, generators)
                            ]
                        )
                    finite = np.isfinite(noisy).reshape(len(x), -1).all(axis=1)
                    if not finite.all():
                        bad = int(np.argmin(finite))
                        name = "stdev" if options["stdev"] is not None else "noise_level"
                        raise ValueError(
                            f"noise of stdev {float(sigmas[bad]):g} ({name}={options[name]!r}) takes the "
                            f"samples of images[{start + bad}] beyond float32; give a smaller {name}"
                        )
                    return noisy

                weights = np.full(samples, 1.0 / samples, np.float32)
                call.update(accumulate=NOISE_METHODS[method])
            elif method == "integrated_gradients":
                alphas, weights = self._points
                baseline = self._baseline_for(start, len(x))
                delta = np.ascontiguousarray(x - baseline)
                call.update(multiplier=delta)

                def rows(first, count, baseline=baseline, delta=delta, alphas=alphas):
                    steps = alphas[first : first + count][None, :, None, None, None]
                    return baseline[:, None] + steps * delta[:, None]

            elif method == "deeplift":  # the baselines forwarded before the images, in the engine
                baseline = np.ascontiguousarray(self._baseline_for(start, len(x)))
                call.update(multiplier=np.ascontiguousarray(x - baseline), baselines=baseline)

            targets = None if classes is None else classes[part]
            outputs = dict(
                top_classes=None if top is None else top[part],
                scores=None if scores is None else scores[part],
            )
            if rows is None:
                saliency._engine.compute(x, targets, out[part], **outputs, **call)
                continue
            # An image's samples in calls of at most a batch of rows, summed in one accumulator:
            # memory stays bounded however many samples or steps.
            passes = batch_slices(samples, batch)
            accumulator = None
            if len(passes) > 1:
                copies = 2 if call.get("accumulate") == "variance" else 1
                accumulator = np.zeros((copies, len(x), k, c, h, w), np.float32)
            for samples_part in passes:
                first, count = samples_part.start, samples_part.stop - samples_part.start
                saliency._engine.compute(
                    np.ascontiguousarray(rows(first, count).reshape(-1, c, h, w), dtype=np.float32),
                    targets,
                    out[part],
                    samples=count,
                    sample_weights=np.ascontiguousarray(weights[first : first + count]),
                    accumulator=accumulator,
                    finish=first + count == samples,
                    **outputs,
                    **call,
                )
        return out, (classes if top is None else top).astype(np.int64), scores

    def _check_baselines_fit(self, count: int) -> None:
        """The baselines against the images of this call and the net as it is now (after net.reshape())."""
        b, shape = self._baselines, self.image_shape
        if b.ndim == 4 and len(b) != count:
            raise ValueError(f"baselines has {len(b)} images but there are {count}")
        if b.ndim and b.shape[-3:] not in (shape, (shape[0], 1, 1)):
            raise ValueError(
                f"baselines are {b.shape[-3:]} images, but the net now takes {shape} "
                "(after net.reshape()); make an Attribution with baselines of that size"
            )

    def _baseline_for(self, start: int, count: int) -> np.ndarray:
        b = self._baselines
        if b.ndim == 4:
            return b[start : start + count]
        return np.broadcast_to(b, (count, *self.image_shape)).astype(np.float32)

    def _convergence_delta(self, images: np.ndarray, classes: np.ndarray, raw: np.ndarray) -> np.ndarray:
        baselines = [self._baseline_for(s, min(64, len(images) - s)) for s in range(0, len(images), 64)]
        if not baselines:  # no images: an empty (0, K) delta, as the maps are empty
            return np.zeros(classes.shape, np.float64)
        rows = np.arange(len(images))[:, None]
        difference = (
            self._scores(images)[rows, classes] - self._scores(np.concatenate(baselines))[rows, classes]
        )
        return raw.reshape(*classes.shape, -1).sum(axis=2, dtype=np.float64) - difference

    def _cams(self, images: np.ndarray, classes, k, want_scores: bool, mode):
        """Grad-CAM (or ++) maps (N, K, h, w), upsampled to (N, K, H, W) unless mode is False; with the
        classes (ranked in the engine when None) and the scores when asked."""
        cam_engine = self._cam
        c, h, w = cam_engine._engine.gradient_shape
        n = len(images)
        classes, k, top, scores = self._targets(n, classes, k, want_scores)
        size = self.image_shape[1:] if mode else (h, w)
        out = np.empty((n, k, *size), np.float32)
        for part in batch_slices(n, cam_engine.batch_size):
            start = part.start
            x = np.ascontiguousarray(images[part], dtype=np.float32)
            grads = np.empty((len(x), k, c, h, w), np.float32)
            acts = np.empty((len(x), c, h, w), np.float32)
            cam_engine._engine.compute(
                x,
                None if classes is None else classes[part],
                grads,
                reduce="none",
                activations=acts,
                top_classes=None if top is None else top[part],
                scores=None if scores is None else scores[part],
                first_index=start,
            )
            if self.method == "gradcam++":
                squared = grads**2
                total = acts.sum(axis=(2, 3))[:, None, :, None, None]
                alpha = np.where(grads != 0, squared / (2 * squared + total * squared * grads + 1e-6), 0)
                weights = (np.maximum(grads, 0) * alpha).sum(axis=(3, 4))
            else:
                weights = grads.mean(axis=(3, 4))
            cams = np.einsum("nkc,nchw->nkhw", weights, acts)
            if self.method == "guided_gradcam" or self.options.get("relu", True):
                cams = np.maximum(cams, 0)
            out[part] = upsample(cams, size, mode) if mode else cams
        return out, (classes if top is None else top).astype(np.int64), scores


def lrp_engine(net: caffe.Net, engine: dict, options: dict) -> Saliency:
    """LRP's engine: the input gradient's, with each layer's backward replaced by its rule (lrp.py)."""
    if engine["device"] is not None:
        raise ValueError("method='lrp' runs on the CPU only (its rules are CPU layers); leave device unset")
    _check_blob_name("input", engine["input"])
    image_shape = net.blobs[engine["input"] or net.inputs[0]].data.shape[1:]  # zbox's bounds fit it
    return Saliency(net, **engine, _layer_rules=lrp.layer_rules(net, options, tuple(image_shape)))


def deeplift_engine(net: caffe.Net, engine: dict) -> Saliency:
    """DeepLIFT's engine: the input gradient's, with every activation and max pooling's backward replaced
    by the Rescale rule (cpp/layers/deeplift_layer.hpp); a layer it has no rule for is refused there."""
    if engine["device"] is not None:
        raise ValueError(
            "method='deeplift' runs on the CPU only (its rules are CPU layers); leave device unset"
        )
    return Saliency(net, **engine, _deeplift=True)


def _reduce(raw: np.ndarray, reduce: str) -> np.ndarray:
    if reduce == "none":
        return raw.astype(np.float32, copy=False)
    if reduce == "sum":
        return raw.sum(axis=2, dtype=np.float32)
    return np.abs(raw).max(axis=2)


def _key(value):
    """A hashable, exact stand-in for an option's value (arrays by content, not by their short repr)."""
    if isinstance(value, np.ndarray):
        return (
            "array",
            value.shape,
            value.dtype.str,
            hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest(),
        )
    return ("value", repr(value))


# One Attribution per net, for the method and options of its latest call (as fastsal.compute does).
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def attribute(
    net: caffe.Net,
    images,
    classes,
    method: str = "saliency",
    *,
    score: str | None = None,
    input: str | None = None,  # noqa: A002
    batch_size: int | None = None,
    exact: bool = True,
    return_convergence_delta: bool = False,
    threads: int | None = None,
    **options,
):
    """Attributions of ``images`` for ``classes`` under ``net`` by ``method``: see :class:`Attribution`.
    The engines are built on first use and cached per net."""
    _check_net(net)
    if threads is not None:  # before the cache: True and 1.0 would find threads=1's engine
        check_threads(threads)
    key = (
        method,
        score,
        input,
        batch_size,
        exact,
        threads,
        tuple(sorted((name, _key(v)) for name, v in options.items())),
    )
    with _cache_lock:
        cached = _cache.get(net)
        hit = cached is not None and cached[0] == key
        if not hit:
            cached = _cache[net] = (
                key,
                Attribution(
                    net,
                    method,
                    score=score,
                    input=input,
                    batch_size=batch_size,
                    exact=exact,
                    threads=threads,
                    **options,
                ),
            )
    if hit:  # the net's weights may have been rewritten since: what an engine derived from them is redone
        cached[1].reload_weights()
    return cached[1].compute(images, classes, return_convergence_delta=return_convergence_delta)
