"""Option values are parsed in one place (engine/core/values.py): yes/no words, integers, numbers —
the same words and the same edge cases for every door, each with the error type its caller names."""

from __future__ import annotations

import math

import pytest

from camserve.engine.core.values import parse_bool, parse_flag, parse_integer, parse_number, truth
from camserve.engine.errors import InvalidOptionError
from camserve.serving.errors import InvalidRequestOptionError
from camserve.serving.options import parse_int


def test_yes_no_words():
    assert [truth(w) for w in ("1", "TRUE", " yes ", "On", True)] == [True] * 5
    assert [truth(w) for w in ("0", "false", "No", "off", False)] == [False] * 5
    assert truth("maybe") is None and truth("") is None and truth("", empty=False) is False
    assert parse_flag("overlay", "", InvalidRequestOptionError) is False  # a serving option: empty is no
    with pytest.raises(InvalidOptionError, match="option 'refine' must be a boolean"):
        parse_bool("refine", "")  # a method option: empty is not a word


def test_integers():
    assert [parse_integer("k", v) for v in (5, 5.0, "+5", " 7 ", "-3")] == [5, 5, 5, 7, -3]
    for bad in (True, 5.5, "5.5", "five", "-+5", None, [5]):
        with pytest.raises(InvalidOptionError, match="must be an integer"):
            parse_integer("k", bad)
    assert parse_int("topk", "3", 1, 20) == 3
    for bad in ("0", "21", "-+5", True):
        with pytest.raises(InvalidRequestOptionError, match=r"option 'topk' must be an integer in \[1, 20\]"):
            parse_int("topk", bad, 1, 20)


def test_numbers():
    assert parse_number("stdevs", "0.25") == 0.25 and parse_number("stdevs", 2) == 2.0
    for bad in (True, "x", None, math.nan, "inf"):
        with pytest.raises(InvalidOptionError):
            parse_number("stdevs", bad)
