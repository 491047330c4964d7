"""gateway.fields: strict reading that reports every problem with its place."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.fields import (
    NOTHING,
    Fields,
    Invalid,
    boolean,
    integer,
    nullable,
    number,
    one_of,
    text,
)


@dataclass(frozen=True)
class Point:
    x: int
    y: int

    @classmethod
    def read(cls, fields: Fields) -> Point:
        return cls(x=fields.get("x", integer()), y=fields.get("y", integer(), 0))


def problems(fields: Fields) -> list[tuple[str, str, object]]:
    return [(p.dotted, p.reason, p.value) for p in fields.problems]


def test_values_defaults_and_required_keys() -> None:
    fields = Fields({"a": 1, "b": "x"})
    assert fields.get("a", integer()) == 1
    assert fields.get("b", text()) == "x"
    assert fields.get("c", integer(), 7) == 7
    assert fields.get("d", integer()) is None  # a stand-in: the problem is recorded
    fields.finish()
    assert problems(fields) == [("d", "required", NOTHING)]
    assert fields.valid("a", "b", "c")
    assert not fields.valid("a", "d")


def test_every_problem_is_recorded_and_reading_goes_on() -> None:
    fields = Fields({"a": "1", "b": True, "c": 1.5, "extra": 3})
    assert fields.get("a", integer(), 5) == 5
    fields.get("b", integer())
    fields.get("c", integer(1, 10))
    fields.finish()
    assert problems(fields) == [
        ("a", "must be an integer", "1"),
        ("b", "must be an integer", True),
        ("c", "must be an integer from 1 to 10", 1.5),
        ("extra", "unknown key", 3),
    ]


def test_nested_tables_and_arrays_are_located() -> None:
    data = {
        "point": {"x": "one", "z": 0},
        "points": [{"x": 1}, {"y": 2}, 3],
        "sizes": [1, "two", 3],
    }
    fields = Fields(data, location=("args",), unknown="unknown field")
    assert fields.table("point", Point.read) is None
    assert len(fields.tables("points", Point.read)) == 3
    assert fields.array("sizes", integer()) == (1, 3)
    fields.finish()
    assert problems(fields) == [
        ("args.point.x", "must be an integer", "one"),
        ("args.point.z", "unknown field", 0),
        ("args.points[1].x", "required", NOTHING),
        ("args.points[2]", "must be a table", 3),
        ("args.sizes[1]", "must be an integer", "two"),
    ]
    assert not fields.valid("point")
    assert not fields.valid("points")
    assert not fields.valid("sizes")


def test_optional_and_absent_tables_and_arrays() -> None:
    fields = Fields({})
    assert fields.table("point", Point.read) is None
    assert fields.array("sizes", integer(), default=(9,)) == (9,)
    assert fields.tables("points", Point.read, default=()) == ()
    fields.array("needed", integer())
    assert problems(fields) == [
        ("point", "required", NOTHING),
        ("needed", "required", NOTHING),
    ]
    # An absent optional table reads as an empty one: its own required keys.
    fields = Fields({})
    fields.table("point", Point.read, optional=True)
    assert problems(fields) == [("point.x", "required", NOTHING)]
    assert Fields({"point": {"x": 1}}).table("point", Point.read) == Point(1, 0)


def test_array_shape() -> None:
    fields = Fields({"a": 1, "b": [1, 2, 3], "c": []})
    fields.array("a", integer())
    fields.array("b", integer(), max_length=2)
    fields.array("c", integer(), min_length=1)
    assert [(p.dotted, p.reason) for p in fields.problems] == [
        ("a", "must be an array"),
        ("b", "must have at most 2 items"),
        ("c", "must have at least 1 item"),
    ]
    fields = Fields({"d": [1]})
    fields.array("d", integer(), min_length=2, max_length=3)
    assert fields.problems[0].reason == "must have 2 to 3 items"


def test_has_marks_a_key_known() -> None:
    fields = Fields({"flag": 1})
    assert fields.has("flag")
    assert not fields.has("other")
    fields.finish()
    assert fields.problems == []


def test_problem_on_the_mapping_itself() -> None:
    fields = Fields({}, location=("args", "target"))
    fields.problem(None, "a site target names site_id and nothing else")
    assert fields.problems[0].dotted == "args.target"
    assert Fields({}).problems == []
    empty = Fields({})
    empty.problem(None, "must be a table")
    assert empty.problems[0].dotted == "(top level)"


@pytest.mark.parametrize(
    ("convert", "value", "reason"),
    [
        (integer(0, 0xFFFF_FFFF), -1, "must be an integer from 0 to 4294967295"),
        (integer(1), 0, "must be an integer of at least 1"),
        (integer(high=5), 6, "must be an integer of at most 5"),
        (number(0.5, 2), 3, "must be a number from 0.5 to 2"),
        (number(), "1", "must be a number"),
        (number(), False, "must be a number"),
        (number(), float("inf"), "must be a finite number"),
        (boolean, 1, "must be true or false"),
        (text(), 5, "must be a string"),
        (text(max_length=3), "abcd", "must be at most 3 characters"),
        (text(r"[a-z]+"), "A", "must match [a-z]+"),
        (text(r"[a-z]+", reason="must be lower case"), "A", "must be lower case"),
        (text(), "x\ud800", "must be valid Unicode (no lone surrogates)"),
        (one_of("a"), "b", "must be 'a'"),
        (one_of("a", "b", "c"), "B", "must be 'a', 'b' or 'c'"),
        (one_of(1, 2), True, "must be 1 or 2"),
        (nullable(integer()), "1", "must be an integer"),
    ],
)
def test_converters_refuse_with_a_reason(convert: object, value: object, reason: str) -> None:
    assert callable(convert)
    with pytest.raises(Invalid) as info:
        convert(value)
    assert str(info.value) == reason


def test_converters_accept() -> None:
    assert integer(0, 10)(10) == 10
    assert number()(2) == 2.0
    assert isinstance(number()(2), float)
    assert boolean(False) is False
    assert text(r"\d+")("123") == "123"
    assert text()("héllo") == "héllo"
    assert one_of("5", "3.1.1")("3.1.1") == "3.1.1"
    assert nullable(integer())(None) is None
    assert nullable(integer())(3) == 3
