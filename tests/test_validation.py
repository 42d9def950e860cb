"""`video2param.validation`: dataclass fields checked against their annotations and bounds, with clear messages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from video2param.validation import check_fields, check_kwargs, describe_type


@dataclass
class Example:
    flag: bool = True
    count: int = field(default=4, metadata={"min": 1, "max": 64})
    ratio: float = field(default=0.5, metadata={"gt": 0, "lt": 1})
    name: str = "x"
    ratios: list[float] | None = field(default=None, metadata={"gt": 0, "max": 1})
    roles: tuple[Literal["q", "k"], ...] = ("q",)
    layers: list[int] | None = field(default=None, metadata={"min": 0})
    mode: Literal["a", "b"] = "a"
    extra: dict[str, Any] = field(default_factory=dict)
    anything: Any = None


def _check(**changes: Any) -> None:
    check_fields(Example(**changes), "opts")


def test_valid_values_pass():
    _check()
    _check(count=1, ratio=1e-9, ratios=[1, 0.5], roles=("q", "k"), layers=[0, 7], mode="b", extra={"a": [1]},
           anything=object())
    _check(roles=["k"])  # JSON has no tuples: a list is fine


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"flag": "false"}, "opts.flag: expected a bool, got 'false' (str)"),
        ({"flag": 0}, "opts.flag: expected a bool, got 0 (int)"),
        ({"count": True}, "opts.count: expected an int, got True (bool)"),
        ({"count": 1e9}, "opts.count: expected an int, got 1000000000.0 (float)"),
        ({"count": "4"}, "opts.count: expected an int, got '4' (str)"),
        ({"count": 0}, "opts.count: must be >= 1, got 0 (int)"),
        ({"count": 65}, "opts.count: must be <= 64, got 65 (int)"),
        ({"ratio": "x"}, "opts.ratio: expected a finite number, got 'x' (str)"),
        ({"ratio": math.inf}, "opts.ratio: expected a finite number, got inf (float)"),
        ({"ratio": math.nan}, "opts.ratio: expected a finite number, got nan (float)"),
        ({"ratio": 0}, "opts.ratio: must be > 0, got 0 (int)"),
        ({"ratio": 1.0}, "opts.ratio: must be < 1, got 1.0 (float)"),
        ({"name": 5}, "opts.name: expected a string, got 5 (int)"),
        ({"ratios": "ab"}, "opts.ratios: expected a list of finite numbers or None, got 'ab' (str)"),
        ({"ratios": [0.5, "b"]}, r"opts.ratios[1]: expected a finite number, got 'b' (str)"),
        ({"ratios": [0.5, 2]}, r"opts.ratios[1]: must be <= 1, got 2 (int)"),
        ({"roles": 5}, "opts.roles: expected a list of values (one of 'q', 'k'), got 5 (int)"),
        ({"roles": "q"}, "opts.roles: expected a list of values (one of 'q', 'k'), got 'q' (str)"),
        ({"roles": ("q", "v")}, "opts.roles[1]: expected one of 'q', 'k', got 'v' (str)"),
        ({"layers": [0, -1]}, "opts.layers[1]: must be >= 0, got -1 (int)"),
        ({"layers": [True]}, "opts.layers[0]: expected an int, got True (bool)"),
        ({"mode": "c"}, "opts.mode: expected one of 'a', 'b', got 'c' (str)"),
        ({"extra": [1]}, "opts.extra: expected a dict (JSON object), got [1] (list)"),
        ({"extra": {1: 2}}, "opts.extra: keys must be a string, got 1 (int)"),
    ],
)
def test_bad_values_are_named(changes, message):
    with pytest.raises(ValueError) as info:
        _check(**changes)
    assert str(info.value) == message


def test_long_values_are_shortened_in_messages():
    with pytest.raises(ValueError) as info:
        _check(name=["x" * 10_000])
    assert len(str(info.value)) < 150 and str(info.value).endswith("... (list)")


def test_literal_does_not_admit_look_alikes():
    @dataclass
    class One:
        value: Literal[1] = 1

    check_fields(One(), "")
    with pytest.raises(ValueError, match=r"^value: expected one of 1, got True \(bool\)$"):
        check_fields(One(True), "")


def test_check_kwargs_checks_before_construction():
    @dataclass
    class Strict:
        dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})

        def __post_init__(self):
            if not 0 <= self.dropout < 1:  # would raise TypeError on a string
                raise ValueError("dropout out of range")

    with pytest.raises(ValueError, match=r"^options.dropout: expected a finite number, got 'x' \(str\)$"):
        check_kwargs(Strict, {"dropout": "x"}, "options")
    check_kwargs(Strict, {"dropout": 0.5, "unknown": 1}, "options")  # unknown keys are the constructor's business


def test_programming_errors_are_type_errors():
    with pytest.raises(TypeError, match="dataclass instance"):
        check_fields(Example, "")
    with pytest.raises(TypeError, match="dataclass type"):
        check_kwargs(Example(), {}, "")


def test_describe_type():
    assert describe_type(list[float] | None) == "a list of finite numbers or None"
    assert describe_type(tuple[str, ...]) == "a list of strings"
    assert describe_type(int | str) == "an int or a string"
