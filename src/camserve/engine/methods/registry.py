"""The one registry of explanation methods: a request's method name → the :class:`Method` that
validates and plans it.

Every family registers here at import — the CAM family (``cam``), the methods read from an LRP
relevance pass (``lrp``), Captum's attributions (``captum``, request names ``captum.<name>``) and the
similarity explanations of embedding models (``similarity``) — and nothing writes to it afterwards;
a caller that needs more methods (the lab's probes) builds an extended copy with :meth:`Registry.extended`
and hands it to its :class:`~camserve.engine.pipeline.Explainer`. Serving, the CLI and the lab ask the
registry what a name means (the lab may also call a family's public functions, e.g. Captum's
``attribute``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

from camserve.engine.errors import InvalidOptionError, UnknownMethodError

FAMILIES = ("cam", "lrp", "captum", "similarity")
TASKS = ("classify", "embed")
CAPTUM_PREFIX = "captum."
#: the families whose methods read the shared forward's capture (the CAM family and the LRP-based ones)
CLASSIC = ("cam", "lrp")


@runtime_checkable
class Method(Protocol):
    """What every registered method tells the pipeline.

    ``name`` (canonical, lower case), ``family`` (one of :data:`FAMILIES`), ``task`` (``classify`` or
    ``embed``), ``coupled_options`` (groups of options that only make sense together: a request naming
    one takes none of its group from a deployment's defaults). ``accepted_options(given)`` is the set of
    option names a request may carry. A classifier's methods also have ``plan(index, spec, context)``:
    it validates a request against the model before any forward and returns its
    :class:`~camserve.engine.core.plan.PlannedRow` — the layers whose activations it reads, or
    ``own_forwards`` for a method that runs forwards of its own (Captum) — and the CAM/LRP methods say
    per options whether they need a gradient or a relevance pass (``needs_gradient_for``,
    ``needs_relevance_for``). The embedding task's methods are planned by ``FamExplainer``.
    """

    name: str
    family: str
    task: str
    coupled_options: Tuple[Tuple[str, ...], ...]

    def accepted_options(self, given: Optional[Mapping[str, Any]] = None) -> set: ...


class Registry:
    """Names (and aliases) → methods. Filled at import, read-only afterwards."""

    def __init__(self, methods: Iterable[Tuple[Method, Sequence[str]]] = ()):
        self._methods: Dict[str, Method] = {}
        self._aliases: Dict[str, str] = {}
        for method, aliases in methods:
            self._add(method, aliases)

    def _add(self, method: Method, aliases: Sequence[str] = ()) -> None:
        if method.family not in FAMILIES or method.task not in TASKS:
            raise ValueError(f"method {method.name!r}: family {method.family!r} / task {method.task!r} unknown")
        if method.name in self._methods:
            raise ValueError(f"method {method.name!r} registered twice")
        self._methods[method.name] = method
        for alias in aliases:
            self._aliases[alias] = method.name

    def extended(self, *methods: Method) -> "Registry":
        """A new registry with this one's methods and ``methods`` (this one is not changed)."""
        copy = Registry()
        copy._methods, copy._aliases = dict(self._methods), dict(self._aliases)
        for method in methods:
            copy._add(method)
        return copy

    def names(self, family: Union[None, str, Tuple[str, ...]] = None, task: Optional[str] = None) -> List[str]:
        """The canonical names, sorted, of one family (or several) and/or task (default: all)."""
        families = (family,) if isinstance(family, str) else family
        return sorted(n for n, m in self._methods.items()
                      if (families is None or m.family in families) and (task is None or m.task == task))

    def key(self, name: Any) -> str:
        """The canonical name of ``name`` (case-insensitive, aliases resolved), known or not."""
        key = str(name).strip().lower()
        return self._aliases.get(key, key)

    def lookup(self, name: Any, task: str = "classify") -> Method:
        """The method a request's ``name`` means for a model of ``task``; :class:`UnknownMethodError`
        (a 400 naming what is available) otherwise."""
        key = self.key(name)
        method = self._methods.get(key)
        if method is not None and method.task == task:
            return method
        if task == "embed":
            raise UnknownMethodError(f"unknown FAM method {name!r}; choose one of {self.names(task='embed')}")
        if key.startswith(CAPTUM_PREFIX):
            raise UnknownMethodError(f"unknown Captum method {name!r}; available: {self.names(family='captum')}")
        raise UnknownMethodError(f"unknown explanation method {name!r}; available: {self.names(family=CLASSIC)}")

    def family(self, name: Any, task: str = "classify") -> str:
        return self.lookup(name, task).family

    # -- comparisons: several methods of one request -------------------------------------------
    def parse_methods(self, value, max_methods: int = 4) -> List[str]:
        """``"shallowcam,captum.integrated_gradients"`` (or a list) → the method names, each known,
        no duplicates, 2 to ``max_methods`` of them."""
        names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else list(value or []))
                 if isinstance(n, str) and n.strip()]
        if not 2 <= len(names) <= max_methods:
            raise InvalidOptionError(f"compare needs 2 to {max_methods} comma-separated methods, got {value!r}")
        if len(set(names)) != len(names):
            raise InvalidOptionError(f"compare lists a method twice: {value!r}")
        for name in names:
            self.lookup(name)
        return names

    def split_options(self, methods: Sequence[str], options: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """Give each method of a comparison the options it accepts (an option several accept goes to
        each); an option no method accepts is an :class:`InvalidOptionError`."""
        options = dict(options or {})
        accepted = [self.lookup(m).accepted_options(options) for m in methods]
        stray = sorted(k for k in options if not any(str(k).lower() in a for a in accepted))
        if stray:
            raise InvalidOptionError(f"option(s) {stray} are taken by none of the compared methods {list(methods)}")
        return [{k: v for k, v in options.items() if str(k).lower() in a} for a in accepted]
