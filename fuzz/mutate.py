"""Input mutation for fuzz/run.py: byte-level havoc, splicing, and JSON-aware edits.

Most of cocoon's untrusted inputs are JSON (inside frames, tars or files), and a
byte flip mostly yields a syntax error the parser refuses on its first line. So
besides AFL-style byte operations, a JSON value found anywhere in an input is
parsed, one node of its tree is changed (a type swapped, a key dropped, a
number pushed to a limit, a subtree spliced in from another seed, nesting
deepened) and it is written back in place. Targets whose inputs frame their
JSON (length-prefixed frames, tar members) use ``mutate_json`` from their own
``mutate`` hook and fix the framing up afterwards.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

#: Tokens worth inserting anywhere: JSON syntax, limits, and text that broke
#: parsers before ("²" is a digit to str.isdigit but not to int()).
TOKENS: tuple[bytes, ...] = (
    b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\\u0000", b"\\ud800", b"null", b"true",
    b"-1", b"0", b"1e999", b"-1e999", b"NaN", b"Infinity", b"1.5", b"4294967296",
    b"18446744073709551616", b"9" * 30, "²".encode(), "\u0663".encode(), b"\x00", b"\xff",
    b"\xc3", b"\n", b"../", b"/proc/self/ns/net", b"sha256:", b"=", b"%s",
)  # fmt: skip

INTERESTING_INTS: tuple[int, ...] = (
    0, 1, -1, 2, 7, 64, 65, 255, 256, 4095, 4096, 65535, 65536, 1 << 20, (1 << 31) - 1, 1 << 31,
    (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64, -(1 << 63) - 1,
    10**400,
)  # fmt: skip

INTERESTING_NUMBERS: tuple[Any, ...] = (
    *INTERESTING_INTS, 1.5, -0.5, 1e308, -1e308, 5e-324, -0.0, float("nan"), float("inf"),
)  # fmt: skip

#: Strings that mean something to a path, an id, a digest or a number parser.
STRING_TOKENS: tuple[str, ...] = (
    "", "²", "\u0663", "\u0000", "\n", "/", ".", "..", "../../../../etc/passwd", "/dev/zero",
    "/proc/self/ns/net", "sha256:" + "0" * 64, "sha256:", "-1", "99999999999999999999", "1e999",
    "a" * 300, ":", "=", ",", "%", "\\", "\udcff",
)  # fmt: skip

INTERESTING_VALUES: tuple[Any, ...] = (
    None, True, False, *STRING_TOKENS[:12], [], {}, [None], {"": None},
)  # fmt: skip

MAX_REPEAT = 5000


class Pool:
    """Keys, strings and subtrees seen in the seeds: spliced into other inputs,
    so a field one seed has reaches the places another seed's tree has."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.values: list[Any] = []

    def learn(self, data: bytes) -> None:
        for _, _, value in json_values(data, random.Random(0), limit=8):
            for node in walk(value):
                if isinstance(node, dict):
                    self.keys.extend(k for k in node if len(self.keys) < 2000)
                small = (
                    not isinstance(node, dict | list) or len(dump(node, random.Random(0))) < 2000
                )
                if len(self.values) < 2000 and small:
                    self.values.append(node)


def json_values(data: bytes, rng: random.Random, limit: int = 4) -> Iterator[tuple[int, int, Any]]:
    """(start, end, value) of up to ``limit`` JSON objects/arrays in ``data``
    (as byte offsets), found at random ``{``/``[`` positions."""
    text = data.decode("utf-8", "surrogateescape")
    starts = [i for i, c in enumerate(text) if c in "{["][:4096]
    rng.shuffle(starts)
    decoder = json.JSONDecoder()
    found = 0
    for start in starts[: limit * 4]:
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        b_start = len(text[:start].encode("utf-8", "surrogateescape"))
        b_end = b_start + len(text[start:end].encode("utf-8", "surrogateescape"))
        yield b_start, b_end, value
        found += 1
        if found >= limit:
            return


def walk(value: Any) -> Iterator[Any]:
    """Every node of a JSON tree, without recursion (trees may be deep)."""
    stack = [value]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _containers(value: Any) -> list[Any]:
    return [n for n in walk(value) if isinstance(n, dict | list)]


def _fresh_value(rng: random.Random, pool: Pool, old: Any) -> Any:
    """A replacement for ``old``: mostly a value of its own type pushed to a limit
    (where checks are missing), else anything (where types are not checked)."""
    r = rng.random()
    if r < 0.5:
        return _same_kind(rng, pool, old)
    if r < 0.65 and pool.values:
        return _copy(rng.choice(pool.values))
    if r < 0.75:
        return _nest(old, rng.choice((2, 10, 70, 200, 1100)), rng)
    if r < 0.8:
        return [old] if rng.random() < 0.5 else {"x": old}
    return _copy(rng.choice(INTERESTING_VALUES + INTERESTING_NUMBERS))


def _same_kind(rng: random.Random, pool: Pool, old: Any) -> Any:
    if isinstance(old, bool):
        return rng.choice((not old, 0, 1, None, "true"))
    if isinstance(old, int | float):
        if rng.random() < 0.2:
            return old + rng.choice((1, -1))
        return rng.choice(INTERESTING_NUMBERS)
    if isinstance(old, str):
        return _string(rng, pool, old)
    if isinstance(old, list):
        return rng.choice(([], old * rng.choice((2, 100)), [_copy(x) for x in reversed(old)]))
    if isinstance(old, dict):
        return {} if rng.random() < 0.5 else {k: None for k in old}
    return _copy(rng.choice(INTERESTING_VALUES))


def _string(rng: random.Random, pool: Pool, old: str) -> str:
    r = rng.random()
    if r < 0.3:
        return mutate_bytes(old.encode("utf-8", "surrogatepass"), rng).decode("utf-8", "replace")
    if r < 0.5:
        strings = [v for v in pool.values[:200] if isinstance(v, str)]
        return rng.choice(strings) if strings else old
    if r < 0.6:
        return old * rng.choice((2, 100, 5000))
    if r < 0.75:
        i = rng.randrange(len(old) + 1)
        return old[:i] + rng.choice(STRING_TOKENS) + old[i:]
    return rng.choice(STRING_TOKENS)


def _copy(value: Any) -> Any:
    """A fresh copy: a shared list put into a tree twice could end up inside itself."""
    try:
        return json.loads(json.dumps(value))
    except RecursionError:  # inputs nest deep on purpose
        return None


def _nest(value: Any, depth: int, rng: random.Random) -> Any:
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def mutate_tree(value: Any, rng: random.Random, pool: Pool) -> Any:
    """One edit somewhere in a JSON tree (in place where it can be; the new root)."""
    nodes = _containers(value)
    if not nodes or rng.random() < 0.05:
        return _fresh_value(rng, pool, value)
    node = rng.choice(nodes)
    if isinstance(node, dict):
        _mutate_object(node, rng, pool)
    else:
        _mutate_array(node, rng, pool)
    return value


def _mutate_object(node: dict[str, Any], rng: random.Random, pool: Pool) -> None:
    op = rng.randrange(5)
    if node and op == 0:
        del node[rng.choice(list(node))]
    elif op == 1 or not node:
        key = rng.choice(pool.keys) if pool.keys and rng.random() < 0.8 else "x"
        node[key] = _fresh_value(rng, pool, node.get(key))
    elif op == 2:
        old = rng.choice(list(node))
        node[rng.choice(pool.keys) if pool.keys else old + "x"] = node.pop(old)
    else:
        key = rng.choice(list(node))
        node[key] = _fresh_value(rng, pool, node[key])


def _mutate_array(node: list[Any], rng: random.Random, pool: Pool) -> None:
    op = rng.randrange(5)
    if node and op == 0:
        del node[rng.randrange(len(node))]
    elif node and op == 1:
        node.insert(rng.randrange(len(node) + 1), _copy(rng.choice(node)))
    elif op == 2 or not node:
        node.append(_fresh_value(rng, pool, None))
    else:
        i = rng.randrange(len(node))
        node[i] = _fresh_value(rng, pool, node[i])


def dump(value: Any, rng: random.Random) -> bytes:
    """JSON text as different writers produce it (compact or spaced, ASCII or UTF-8)."""
    compact = rng.random() < 0.5
    try:
        text = json.dumps(
            value,
            ensure_ascii=rng.random() < 0.5,
            separators=(",", ":") if compact else (", ", ": "),
        )
        return text.encode("utf-8", "surrogateescape")
    except (UnicodeEncodeError, RecursionError, ValueError):
        try:
            return json.dumps(value).encode()
        except (RecursionError, ValueError):
            return b"null"


def mutate_json(data: bytes, rng: random.Random, pool: Pool) -> bytes | None:
    """``data`` with one JSON value in it edited; None when it holds none."""
    for start, end, value in json_values(data, rng, limit=1):
        for _ in range(rng.choice((1, 1, 1, 2, 4))):
            value = mutate_tree(value, rng, pool)
        return data[:start] + dump(value, rng) + data[end:]
    return None


# -- bytes --------------------------------------------------------------------


def _flip(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    b[i] ^= 1 << rng.randrange(8)


def _set_byte(b: bytearray, rng: random.Random) -> None:
    b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x20, rng.randrange(256)))


def _delete(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    del b[i : i + rng.choice((1, 1, 2, 4, 16, 128, 512))]


def _duplicate(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    n = rng.choice((1, 4, 16, 128, 512))
    b[i:i] = b[i : i + n] * rng.choice((1, 2, 8))


def _insert_token(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b) + 1)
    b[i:i] = rng.choice(TOKENS)


def _repeat_token(b: bytearray, rng: random.Random) -> None:
    """Long runs: nesting (``[[[[``), digit strings, chained headers."""
    i = rng.randrange(len(b) + 1)
    b[i:i] = rng.choice((b"[", b"{", b'{"a":', b"9", b"\\", b'"', rng.choice(TOKENS))) * (
        rng.choice((16, 300, 1100, MAX_REPEAT))
    )


def _number(b: bytearray, rng: random.Random) -> None:
    """Replace a run of ASCII digits with a limit (sizes, lengths, ids live there)."""
    digits = [i for i in range(len(b)) if 48 <= b[i] <= 57]
    if not digits:
        _insert_token(b, rng)
        return
    i = j = rng.choice(digits)
    while i > 0 and 48 <= b[i - 1] <= 57:
        i -= 1
    while j < len(b) and 48 <= b[j] <= 57:
        j += 1
    b[i:j] = str(rng.choice(INTERESTING_INTS)).encode()


def _overwrite_word(b: bytearray, rng: random.Random) -> None:
    """A little/big-endian integer limit over 1-8 bytes (binary headers)."""
    n = rng.choice((1, 2, 4, 8))
    v = rng.choice(INTERESTING_INTS) % (1 << (8 * n))
    i = rng.randrange(len(b))
    b[i : i + n] = v.to_bytes(n, rng.choice(("little", "big")))


BYTE_OPS: tuple[Callable[[bytearray, random.Random], None], ...] = (
    _flip, _set_byte, _delete, _duplicate, _insert_token, _repeat_token, _number, _overwrite_word,
)  # fmt: skip


def mutate_bytes(data: bytes, rng: random.Random, max_len: int = 1 << 16) -> bytes:
    """AFL's havoc: a few stacked byte-level edits."""
    b = bytearray(data or b"\x00")
    for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
        rng.choice(BYTE_OPS)(b, rng)
        if not b:
            b = bytearray(b"\x00")
    return bytes(b[:max_len])


def splice(a: bytes, b: bytes, rng: random.Random) -> bytes:
    """The head of one input with the tail of another (crossover)."""
    if not a or not b:
        return a or b
    return a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b)) :]


class Mutator:
    """Chooses a strategy per input; ``custom`` is a target's own ``mutate`` hook."""

    def __init__(
        self,
        rng: random.Random,
        pool: Pool,
        custom: Callable[[bytes, random.Random, Pool], bytes] | None,
        max_len: int,
    ) -> None:
        self.rng = rng
        self.pool = pool
        self.custom = custom
        self.max_len = max_len

    def mutate(self, data: bytes, other: bytes) -> bytes:
        rng = self.rng
        r = rng.random()
        out: bytes | None = None
        # A target with its own mutation frames its JSON (lengths, digests):
        # edits that ignore the framing mostly die at the first length check.
        custom, json_, splice_ = (0.6, 0.75, 0.8) if self.custom else (0.0, 0.6, 0.7)
        try:
            if self.custom is not None and r < custom:
                out = self.custom(data, rng, self.pool)
            elif r < json_:
                out = mutate_json(data, rng, self.pool)
            elif r < splice_:
                out = splice(data, other, rng)
        except Exception:  # noqa: BLE001 (a hook tripped on an odd input: use bytes instead)
            out = None
        if out is None:
            out = mutate_bytes(data, rng, self.max_len)
        return out[: self.max_len]
