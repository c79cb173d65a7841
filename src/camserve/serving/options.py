"""Per-request options: what a classifier request asks for, validated before the batch runs.

Options come, in increasing priority, from the query string (``?explain=gradcam&layer=…``), from
multipart text fields, and from JSON keys (top level, or per KServe instance / v2 ``parameters``).
Reserved names are the serving options below; any other name is passed to the method as a method
option (e.g. Shallow-CAM's ``spatial=relevance``), where the engine rejects unknown ones with 400.

``compare=<m1>,<m2>[,…]`` (instead of ``explain=``) asks for one explanation per method of the same
image and target; ``layer`` applies to each (else each method's configured layer), and every method
option goes to the compared methods that accept it (one no method accepts is a 400).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from camserve.engine.methods import REGISTRY
from camserve.engine.pipeline import ExplainSpec
from camserve.engine.imaging.render import COLORMAPS
from camserve.engine.core import values
from camserve.serving.errors import InvalidRequestOptionError
from camserve.serving.settings import HandlerSettings

#: Names that are never method options.
SERVING_OPTIONS = {"explain", "method", "compare", "layer", "target", "format", "colormap", "overlay", "alpha",
                   "topk", "model_name"}  # model_name: the /invocations route's own query parameter
#: the serving options a plain prediction (no explanation) uses
PLAIN_OPTIONS = {"explain", "method", "compare", "topk", "model_name"}
FORMATS = ("png", "array")


def as_text(value: Any, name: Optional[str] = None) -> Any:
    """Query and multipart values arrive as bytes; JSON values keep their type."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            where = f"option {name!r}: " if name else ""
            raise InvalidRequestOptionError(f"{where}option values must be UTF-8 text") from None
    return value.strip() if isinstance(value, str) else value


def parse_flag(name: str, value: Any) -> bool:
    """A serving option's yes/no value (an empty text is no)."""
    return values.parse_flag(name, value, InvalidRequestOptionError)


def parse_colormap(value: Any) -> str:
    """A colormap name, lower-cased; unknown → 400."""
    name = str(value).lower()
    if name not in COLORMAPS:
        raise InvalidRequestOptionError(f"unknown colormap {name!r}; choose one of {list(COLORMAPS)}")
    return name


def parse_int(name: str, value: Any, low: int, high: int) -> int:
    """An integer serving option in ``[low, high]`` (:func:`~camserve.engine.core.values.parse_integer`)."""
    try:
        number = values.parse_integer(name, value, ValueError)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise InvalidRequestOptionError(f"option {name!r} must be an integer in [{low}, {high}], got {value!r}")
    return number


@dataclass
class ExplainOptions:
    """One image's request: ``method`` None and no ``compare`` means a plain prediction; ``compare``
    holds one :class:`ExplainSpec` per compared method (then ``method`` is None)."""

    method: Optional[str] = None
    layer: Optional[str] = None
    target: Any = None
    format: str = "png"
    colormap: Optional[str] = None
    #: the overlay's colormap when the request names none: the archive's ``handler.colormap``
    default_colormap: str = "jet"
    overlay: bool = False
    alpha: float = 0.5
    topk: int = 5
    method_options: Dict[str, Any] = field(default_factory=dict)
    compare: List[ExplainSpec] = field(default_factory=list)

    def spec(self) -> Optional[ExplainSpec]:
        """The engine's :class:`ExplainSpec`, or ``None`` for a plain prediction."""
        if self.method is None:
            return None
        return ExplainSpec(self.method, self.layer, self.target, dict(self.method_options))


def parse_options(raw: Mapping[str, Any], settings: HandlerSettings, explain_route: bool) -> ExplainOptions:
    """Validate the serving options of one image; method options are validated by the engine."""
    raw = {str(k).lower(): as_text(v, str(k)) for k, v in raw.items()}
    method = raw.get("explain", raw.get("method"))
    compare = raw.get("compare")
    if compare in (None, ""):
        compare = None
    elif method not in (None, ""):
        raise InvalidRequestOptionError("options 'compare' and 'explain' exclude each other: "
                                        "compare=<method>,<method> explains the image with each method")
    if compare is not None:
        method = None
    elif isinstance(method, bool) or (isinstance(method, str) and values.truth(method.lower(), empty=False) is not None
                                      and method == method.strip()):
        method = settings.default_method if parse_flag("explain", method) else None
    elif method is not None:
        method = str(method).strip().lower() or None
    if method is None and explain_route and compare is None:
        method = settings.default_method
    options = ExplainOptions(topk=settings.topk, alpha=settings.overlay_alpha,
                             default_colormap=parse_colormap(settings.colormap or "jet"))
    options.method = method
    if "topk" in raw:
        options.topk = parse_int("topk", raw["topk"], 1, settings.max_topk)
    if method is None and compare is None:
        # a plain prediction: every other option would be ignored, so each is a 400
        stray = sorted(k for k in raw if k in SERVING_OPTIONS - PLAIN_OPTIONS)
        if stray:
            raise InvalidRequestOptionError(f"options {stray} need an explanation: add explain=<method>")
        unknown = sorted(k for k in raw if k not in SERVING_OPTIONS)
        if unknown:
            raise InvalidRequestOptionError(f"unknown option(s) {unknown} for a plain prediction (serving options: "
                                            f"{sorted(SERVING_OPTIONS - {'model_name'})}; method options need "
                                            f"explain=<method>)")
        return options
    requested_layer = raw.get("layer") or None
    options.layer = settings.layer_for(method, requested_layer) if method is not None else requested_layer
    target = raw.get("target")
    options.target = None if target in (None, "") else target
    fmt = str(raw.get("format", "png")).lower()
    if fmt not in FORMATS:
        raise InvalidRequestOptionError(f"option 'format' must be one of {list(FORMATS)}, got {fmt!r}")
    options.format = fmt
    if raw.get("colormap") not in (None, ""):
        options.colormap = parse_colormap(raw["colormap"])
    if "overlay" in raw:
        options.overlay = parse_flag("overlay", raw["overlay"])
    if "alpha" in raw:
        try:
            options.alpha = values.parse_number("alpha", raw["alpha"], ValueError)
        except (TypeError, ValueError):
            options.alpha = -1.0
        if not 0.0 <= options.alpha <= 1.0:
            raise InvalidRequestOptionError(f"option 'alpha' must be a number in [0, 1], got {raw['alpha']!r}")
    method_options = {k: v for k, v in raw.items() if k not in SERVING_OPTIONS}
    if compare is None:
        options.method_options = settings.options_for(method, method_options)
        return options
    names = REGISTRY.parse_methods(compare)
    options.compare = [ExplainSpec(name, settings.layer_for(name, requested_layer), options.target,
                                   settings.options_for(name, own))
                       for name, own in zip(names, REGISTRY.split_options(names, method_options))]
    return options
