"""The Captum attributions camserve offers, their options, and the limits that protect a server.

Every method is named ``captum.<name>`` in a request. Options arrive as JSON values or query strings
and are validated here, before any model call, into a canonical hashable dict:

==========================  ===================================================================
``captum.integrated_gradients``  ``IG_i(x) = (x_i − x'_i) · ∫₀¹ ∂y_c(x' + α(x − x'))/∂x_i dα``
                                 with baseline ``x' = 0`` in the model's *normalised* input space,
                                 ``steps`` quadrature points (default 16, ≤ ``max_steps``),
                                 ``integration`` (Captum's ``method``), ``internal_batch_size``.
``captum.saliency``             ``S_i(x) = ∂y_c/∂x_i`` (Simonyan et al. 2014).
``captum.guided_gradcam``       ``GuidedBackprop(x) ⊙ upsample(Grad-CAM_l(x))`` at input size (layer l).
``captum.layer_gradcam``        ``ReLU(Σ_k mean_ij(∂y_c/∂A_kij) · A_k)`` at layer l (``relu_attributions``),
                                 then upsampled like camserve's Grad-CAM.
``captum.layer_lrp``            Captum's LayerLRP relevance ``R^l`` (default epsilon rules) at layer l.
``captum.noise_tunnel``         SmoothGrad over ``base``: ``(1/n) Σ_s A(x + ε_s)``, ``ε_s ~ N(0, σ²)``
                                 (``nt_samples`` n, ``stdevs`` σ, ``nt_type``, ``seed``); the same as
                                 ``smooth=1`` on any of the above.
==========================  ===================================================================

Pixel attributions ``(3, H, W)`` and LayerLRP's ``(C, h, w)`` become one map by the ``reduction``
option over channels: ``abs`` = ``Σ_c |a_c|`` (default for pixel methods), ``positive`` =
``max(Σ_c a_c, 0)`` (default for LayerLRP; Captum's visualiser's "positive" sign), ``sum`` =
``Σ_c a_c`` (signed; min-max normalisation then puts 0 somewhere inside [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from camserve.engine.errors import InvalidOptionError, UnknownMethodError
from camserve.engine.core.values import parse_bool, parse_integer, parse_number

PREFIX = "captum."
REDUCTIONS = ("abs", "positive", "sum")
INTEGRATIONS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")
INTERPOLATIONS = ("nearest", "bilinear")


@dataclass(frozen=True)
class CaptumLimits:
    """Caps a request cannot exceed (a server sets its own; these are the defaults).

    ``max_evaluations`` bounds the model evaluations one image may cost:
    ``steps × nt_samples`` (IG under a noise tunnel) or ``nt_samples`` alone.
    ``max_batch_evaluations`` bounds them for a whole served batch (the handler counts each Captum
    row's evaluations × targets and each ``compare`` method; it must be ≥ ``max_evaluations``).
    """

    max_steps: int = 256
    max_samples: int = 64
    max_internal_batch_size: int = 512
    max_evaluations: int = 2048
    max_batch_evaluations: int = 2048


DEFAULT_LIMITS = CaptumLimits()


def parse_int(name: str, value: Any) -> int:
    """An integer option (:func:`~camserve.engine.core.values.parse_integer`)."""
    return parse_integer(name, value)


def parse_float(name: str, value: Any) -> float:
    """A finite number option (:func:`~camserve.engine.core.values.parse_number`)."""
    return parse_number(name, value)


def _bounded_int(name: str, value: Any, low: int, high: int, cap_name: str) -> int:
    number = parse_int(name, value)
    if number < low:
        raise InvalidOptionError(f"option {name!r} must be ≥ {low}, got {number}")
    if number > high:
        raise InvalidOptionError(f"option {name!r} = {number} exceeds this server's cap {cap_name}={high}")
    return number


def _choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise InvalidOptionError(f"option {name!r} must be one of {list(choices)}, got {value!r}")
    return text


@dataclass(frozen=True)
class CaptumMethod:
    """One Captum attribution: its request name, whether it attributes to a layer or to the input,
    its own option defaults, and the default channel reduction (``None``: the output has one channel)."""

    name: str
    uses_layer: bool
    own_options: Tuple[Tuple[str, Any], ...] = ()
    default_reduction: Optional[str] = "abs"
    relevance: bool = False  # its backward is an LRP relevance pass

    @property
    def request_name(self) -> str:
        return PREFIX + self.name


METHODS: Dict[str, CaptumMethod] = {m.name: m for m in (
    CaptumMethod("integrated_gradients", False,
                 (("steps", 16), ("integration", "gausslegendre"), ("internal_batch_size", 32))),
    CaptumMethod("saliency", False),
    CaptumMethod("guided_gradcam", True, (("interpolate_mode", "nearest"),)),
    CaptumMethod("layer_gradcam", True, (("relu_attributions", True),), default_reduction=None),
    CaptumMethod("layer_lrp", True, default_reduction="positive", relevance=True),
)}
ALIASES = {"ig": "integrated_gradients", "integratedgradients": "integrated_gradients",
           "guidedgradcam": "guided_gradcam", "layergradcam": "layer_gradcam", "gradcam": "layer_gradcam",
           "layerlrp": "layer_lrp", "lrp": "layer_lrp", "smoothgrad": "noise_tunnel", "noisetunnel": "noise_tunnel"}
NOISE_OPTIONS = (("nt_samples", 8), ("stdevs", 0.2), ("nt_type", "smoothgrad"), ("nt_samples_batch_size", 0),
                 ("seed", -1))
OPTION_ALIASES = {"n_steps": "steps", "method": "integration", "samples": "nt_samples", "stdev": "stdevs",
                  "sigma": "stdevs"}


def is_captum(name: Any) -> bool:
    """Whether a request method name is a Captum one (``captum.…``)."""
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


def _key(name: str) -> str:
    key = str(name).strip().lower()
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return ALIASES.get(key, key)


def available() -> list:
    return sorted(PREFIX + n for n in list(METHODS) + ["noise_tunnel"])


def get_captum_method(name: str) -> CaptumMethod:
    """The Captum method of a request name (``captum.noise_tunnel`` resolves through its ``base`` option
    in :func:`resolve`); unknown names raise :class:`UnknownMethodError`."""
    key = _key(name)
    if key not in METHODS:
        raise UnknownMethodError(f"unknown Captum method {name!r}; available: {available()}")
    return METHODS[key]


def check_name(name: str) -> str:
    """The canonical request name of a Captum method (``captum.noise_tunnel`` included), or
    :class:`UnknownMethodError`."""
    key = _key(name)
    return PREFIX + key if key == "noise_tunnel" else get_captum_method(name).request_name


def resolve(name: str, given: Optional[Mapping[str, Any]], limits: CaptumLimits = DEFAULT_LIMITS
            ) -> Tuple[CaptumMethod, Dict[str, Any]]:
    """Validate a request: ``(method, options)`` with every option canonical and within ``limits``.

    ``captum.noise_tunnel`` takes ``base=<method>``; any method takes ``smooth=1``. The returned
    options always contain ``smooth`` (bool), ``reduction`` (or ``None``) and, when smoothing, the
    noise-tunnel options; they are plain scalars, so a dict of them can group requests.
    """
    given = {OPTION_ALIASES.get(str(k).strip().lower(), str(k).strip().lower()): v for k, v in dict(given or {}).items()}
    key = _key(name)
    smooth_default = False
    if key == "noise_tunnel":
        if "base" not in given:
            raise InvalidOptionError(f"captum.noise_tunnel needs option 'base', one of {sorted(PREFIX + m for m in METHODS)}")
        base = given.pop("base")
        if _key(base) == "noise_tunnel":
            raise InvalidOptionError("captum.noise_tunnel cannot smooth itself")
        method = get_captum_method(base)
        smooth_default = True
        if "smooth" in given and not parse_bool("smooth", given["smooth"]):
            raise InvalidOptionError("captum.noise_tunnel always smooths; drop 'smooth' or use the base method")
    else:
        method = get_captum_method(name)
    smooth = parse_bool("smooth", given.pop("smooth", smooth_default))
    allowed = dict(method.own_options)
    if method.default_reduction is not None:
        allowed["reduction"] = method.default_reduction
    if smooth:
        allowed.update(NOISE_OPTIONS)
    unknown = set(given) - set(allowed)
    if unknown:
        raise InvalidOptionError(f"method {method.request_name!r}{' (smoothed)' if smooth else ''} has no option "
                                 f"{sorted(unknown)}; it takes {sorted(allowed) + ['smooth']}")
    values = {**allowed, **given}
    options: Dict[str, Any] = {"smooth": smooth}
    for option, value in values.items():
        options[option] = _check(option, value, limits)
    evaluations = options.get("steps", 1) * (options.get("nt_samples", 1) if smooth else 1)
    if evaluations > limits.max_evaluations:
        raise InvalidOptionError(f"{method.request_name} would evaluate the model {evaluations} times per image "
                                 f"(steps × nt_samples); this server's cap is max_evaluations={limits.max_evaluations}")
    return method, options


def accepted_options(name: str, given: Optional[Mapping[str, Any]] = None) -> set:
    """The option names (aliases included) a request for ``name`` may carry, given its other options
    (``smooth``/``noise_tunnel`` add the noise options) — for splitting one request's options
    between several methods (``compare``)."""
    given = {OPTION_ALIASES.get(str(k).strip().lower(), str(k).strip().lower()): v for k, v in dict(given or {}).items()}
    key = _key(name)
    tunnel = key == "noise_tunnel"
    method = get_captum_method(given.get("base", "")) if tunnel and given.get("base") else (
        None if tunnel else get_captum_method(name))
    names = {"smooth"} | ({"base"} if tunnel else set())
    if method is not None:
        names |= {option for option, _ in method.own_options}
        if method.default_reduction is not None:
            names.add("reduction")
    if tunnel or ("smooth" in given and parse_bool("smooth", given["smooth"])):
        names |= {option for option, _ in NOISE_OPTIONS}
    return names | {alias for alias, target in OPTION_ALIASES.items() if target in names}


def _check(option: str, value: Any, limits: CaptumLimits) -> Any:
    if option == "steps":
        return _bounded_int("steps", value, 1, limits.max_steps, "max_steps")
    if option == "internal_batch_size":
        return _bounded_int("internal_batch_size", value, 1, limits.max_internal_batch_size, "max_internal_batch_size")
    if option == "nt_samples":
        return _bounded_int("nt_samples", value, 1, limits.max_samples, "max_samples")
    if option == "nt_samples_batch_size":  # 0 = all samples of a batch in one go
        return _bounded_int("nt_samples_batch_size", value, 0, limits.max_samples, "max_samples")
    if option == "seed":  # -1 = the current global RNG stream
        return _bounded_int("seed", value, -1, 2 ** 63 - 1, "max_seed")
    if option == "stdevs":
        number = parse_float("stdevs", value)
        if number <= 0:
            raise InvalidOptionError(f"option 'stdevs' must be > 0, got {value!r}")
        return number
    if option == "reduction":
        return _choice("reduction", value, REDUCTIONS)
    if option == "integration":
        return _choice("integration", value, INTEGRATIONS)
    if option == "nt_type":
        return _choice("nt_type", value, NT_TYPES)
    if option == "interpolate_mode":
        return _choice("interpolate_mode", value, INTERPOLATIONS)
    if option == "relu_attributions":
        return parse_bool("relu_attributions", value)
    raise InvalidOptionError(f"unexpected option {option!r}")  # unreachable: names are checked first


def display_name(method: CaptumMethod, options: Mapping[str, Any]) -> str:
    """The name an explanation reports: ``captum.<method>``, or ``captum.noise_tunnel(<method>)``."""
    return f"{PREFIX}noise_tunnel({method.name})" if options.get("smooth") else method.request_name
