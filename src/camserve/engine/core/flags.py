"""Yes/no words, parsed in one place: ``1/true/yes/on`` and ``0/false/no/off`` (any case, spaces
trimmed), booleans as they are. Every option, setting and environment switch reads them here."""

from __future__ import annotations

from typing import Any, Optional

from camserve.engine.errors import InvalidOptionError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def truth(value: Any, empty: Optional[bool] = None) -> Optional[bool]:
    """``True``/``False`` for a boolean or a yes/no word; ``empty`` for an empty text; else ``None``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    return empty if text == "" else None


def parse_flag(name: str, value: Any, error: type = ValueError, expected: str = "0/1/true/false",
               empty: Optional[bool] = False) -> bool:
    """:func:`truth` or ``error`` naming the option and what it expected."""
    answer = truth(value, empty)
    if answer is None:
        raise error(f"option {name!r} must be {expected}, got {value!r}")
    return answer


def parse_bool(name: str, value: Any) -> bool:
    """A method option's yes/no value (:class:`InvalidOptionError` otherwise; no empty text)."""
    return parse_flag(name, value, InvalidOptionError, "a boolean", empty=None)
