"""Option values, parsed in one place: yes/no words (``1/true/yes/on``, ``0/false/no/off``, any case,
spaces trimmed; booleans as they are), integers and finite numbers. Every request option, setting and
environment switch reads them here; each caller names the error type its door answers with."""

from __future__ import annotations

import math
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


def parse_integer(name: str, value: Any, error: type = InvalidOptionError) -> int:
    """An integer from an int, an integral float or a decimal string (sign allowed); booleans,
    fractions and other text are ``error``."""
    if not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    raise error(f"option {name!r} must be an integer, got {value!r}")


def parse_number(name: str, value: Any, error: type = InvalidOptionError) -> float:
    """A finite float from a number or a numeric string; booleans, text, NaN and infinities are ``error``."""
    if isinstance(value, bool):
        raise error(f"option {name!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"option {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"option {name!r} must be finite, got {value!r}")
    return number
