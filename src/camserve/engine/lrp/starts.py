"""The initial-relevance options of the LRP-based methods: ``start``, its ``contrastive`` alias and
the softmax start's ``temperature`` (``engine/lrp/starts.py``), resolved in one place for
every method that seeds a relevance pass.

A method mixes :class:`RelevanceStartOptions` in before :class:`~.base.CamMethod` and adds
:data:`START_OPTION_CHOICES` (with its own ``contrastive`` default) to its ``option_choices``.
"""

from __future__ import annotations

from camserve.engine.core.targets import STARTS, check_temperature, resolve_start

#: ``start`` and ``temperature`` as ``option_choices`` placeholders: both are validated by
#: :meth:`RelevanceStartOptions.options` (``resolve_start``, ``check_temperature``), not by the base
START_OPTION_CHOICES = {"start": (None, (None,) + STARTS), "temperature": (None, (None,))}


class RelevanceStartOptions:
    """``options(given)``: the base resolution of the other options, then ``start`` reconciled with
    ``contrastive`` (``resolve_start``; :attr:`DEFAULT_START` when the request names neither) and the
    softmax start's ``temperature`` checked against it (``check_temperature``)."""

    #: a request naming one of these takes none of them from a deployment's defaults
    coupled_options = (("start", "contrastive", "temperature"),)
    #: the initial relevance when a request names neither ``start`` nor ``contrastive``
    DEFAULT_START = "contrastive"

    def options(self, given):
        given = dict(given or {})
        start = given.pop("start", None)
        temperature = given.pop("temperature", None)
        resolved = resolve_start(self.name, super().options(given), start, "contrastive" in given,
                                 self.DEFAULT_START)
        return check_temperature(self.name, resolved, temperature)
