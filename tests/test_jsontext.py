"""The compact encoder gives what `json.dumps` gives, text and errors, without its cost."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from agentd.jsontext import compact_encoder, lenient_encoder

VALUES: list[Any] = [
    None, True, False, 0, -7, 2**70, 1.5, 1e-300, "", "plain", "é ☃ \x00 \" \\ \n", [], {},
    {"task_id": 123, "name": "bench.noop", "status": "succeeded", "attempt": 1},
    {"nested": [1, {"a": [None, 2.25, "x"]}], 3: "int key", 1.5: "float key", None: "null key",
     True: "bool key"},
    (1, 2, ("tuple", "in", "tuple")),
]


@pytest.mark.parametrize("value", VALUES)
def test_the_text_is_json_dumps_compact(value: Any) -> None:
    assert compact_encoder()(value) == json.dumps(value, separators=(",", ":"))


def test_default_is_applied_to_what_json_cannot_encode() -> None:
    value = {"when": object.__new__(type("Stamp", (), {"__str__": lambda self: "noon"}))}
    assert compact_encoder(default=str)(value) == '{"when":"noon"}'


def test_what_is_not_json_raises_as_json_dumps_does() -> None:
    encode = compact_encoder()
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode({"set": {1, 2}})
    assert encode({"after": "a failure"}) == '{"after":"a failure"}'  # nothing left behind
    with pytest.raises(ValueError, match="Out of range float"):
        compact_encoder(allow_nan=False)([math.nan])
    assert compact_encoder()([math.inf]) == "[Infinity]"


def test_a_value_that_contains_itself_raises_instead_of_looping() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(RecursionError):
        compact_encoder()(loop)


@pytest.mark.parametrize("value", VALUES)
def test_the_lenient_text_reads_back_as_json_dumps_would(value: Any) -> None:
    assert json.loads(lenient_encoder()(value)) == json.loads(json.dumps(value))


def test_the_lenient_encoder_always_gives_valid_json() -> None:
    encode = lenient_encoder()
    stamp = object.__new__(type("Stamp", (), {"__str__": lambda self: "noon"}))
    assert json.loads(encode({"when": stamp, "set": {1}})) == {"when": "noon", "set": "{1}"}
    assert encode([math.nan, math.inf]) == "[null,null]"
    assert encode("é ☃") == '"é ☃"'
    # What orjson refuses goes through the stdlib: integers past 64 bits, deep nesting.
    assert encode({"big": 2**70}) == '{"big":1180591620717411303424}'
    deep: Any = "bottom"
    for _ in range(300):
        deep = [deep]
    assert json.loads(encode(deep)) == deep
