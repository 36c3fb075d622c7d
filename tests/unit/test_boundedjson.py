"""The bounded JSON loader every decoder of untrusted JSON goes through."""

from __future__ import annotations

import json
import random
import time

import pytest

from cocoon.util.boundedjson import JSONError, loads, nesting_depth


@pytest.mark.parametrize(
    "text, depth",
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "{{{", "\\"[["]', 1),  # brackets inside strings do not nest
        ('[["a\\\\"], []]', 2),  # an escaped backslash ends before the quote
        ('["unterminated [[[[', 1),  # the parser stops at the string, recursing no further
    ],
)
def test_depth_is_counted_outside_strings(text: str, depth: int) -> None:
    assert nesting_depth(text) == depth


def test_deep_nesting_is_refused_before_parsing() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(JSONError, match="nested 100000 deep"):
        loads(deep, max_bytes=1 << 20, max_depth=64)
    ok = b"[" * 64 + b"]" * 64
    assert loads(ok, max_bytes=1 << 20, max_depth=64) is not None
    # Unbalanced and half-parsed: refused the same way, never a RecursionError.
    with pytest.raises(JSONError):
        loads('{"a":' * 5000, max_bytes=1 << 20, max_depth=64)


@pytest.mark.parametrize(
    "text",
    ['"' + '\\"' * 300_000, '"' + '\\"' * 300_000 + "\\", '"' * 600_000, "[" * 600_000],
)
def test_prescan_is_linear_on_hostile_quoting(text: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(JSONError):
        loads(text + "[" * 100, max_bytes=1 << 20, max_depth=8)
    assert time.monotonic() - t0 < 2.0


def test_size_encoding_and_non_numbers_are_refused() -> None:
    with pytest.raises(JSONError, match="more than the 10 B"):
        loads(b"[" + b" " * 20 + b"]", max_bytes=10)
    with pytest.raises(JSONError, match="not UTF-8"):
        loads(b'"\xff\xfe\xfd"', max_bytes=100)
    for bad in (b"[NaN]", b"[-Infinity]", b"[1e999]", b'{"a": 1,}'):
        with pytest.raises(JSONError):
            loads(bad, max_bytes=100)
    # The reason is one line and does not quote the input.
    with pytest.raises(JSONError) as e:
        loads(b'{"secret\nvalue": x}', max_bytes=100)
    assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_valid_documents_parse_as_the_stdlib_does() -> None:
    doc = {"a": [1, 2.5, None, True, "x[{"], "b": {"c": "é"}}
    text = json.dumps(doc)
    assert loads(text.encode(), max_bytes=1000) == doc
    assert loads(text, max_bytes=1000) == doc
    assert loads(text.encode("utf-16"), max_bytes=1000) == doc  # as json.loads detects it


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_depth_matches_the_document_for_tricky_strings() -> None:
    """Strings full of quotes, backslashes and brackets, as json.dumps writes them."""
    rng = random.Random(19)
    pieces = ['"', "\\", "[", "]", "{", "}", "\\\\", '\\"', "a", "\n", "\u00e9"]

    def make(depth: int) -> object:
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(8)))
        if depth == 0 or rng.random() < 0.3:
            return text
        if rng.random() < 0.5:
            return [make(depth - 1) for _ in range(rng.randrange(3))]
        return {text + str(i): make(depth - 1) for i in range(rng.randrange(3))}

    for _ in range(2000):
        doc = make(6)
        for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False, indent=1)):
            assert nesting_depth(text) == _depth(doc), text


@pytest.mark.parametrize(
    "text",
    ['{"a":[1,2.5]}', ' {"a":1}', '{"a":1} ', '{"a":1}\n', "[]", '"s"', "1", "null"],
)
def test_compact_and_spaced_documents_parse_alike(text: str) -> None:
    """The one-scan path (a compact document) and the decoder's (whitespace
    around it) give what the stdlib gives, from str and from bytes."""
    assert loads(text, max_bytes=100) == json.loads(text)
    assert loads(text.encode(), max_bytes=100) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a":1}x', '{"a":1} {}', "", " ", '{"a":NaN}', "[1e999]", "{"])
def test_what_follows_or_breaks_a_compact_document_is_refused(text: str) -> None:
    with pytest.raises(JSONError):
        loads(text, max_bytes=100)
