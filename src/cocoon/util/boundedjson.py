"""JSON from untrusted bytes, with its size and nesting bounded before it is parsed.

The stdlib parser recurses once per ``[`` or ``{``: a document nested ~1,000
deep (a few KB) raises RecursionError from deep inside ``json.loads``, which
no caller expects, and code that walks the result recurses again (deepcopy
costs several frames per level). So the depth is measured first, without
recursing: strings are cut out (brackets inside them do not nest) and the
remaining brackets are counted. The agent decodes host messages through this
module too, so it is shipped in the guest image: stdlib only, cheap to import.

Every failure is a ``JSONError`` (a ValueError) with a one-line reason that
echoes nothing of the input; each caller maps it to its own error class.
NaN and the infinities are refused too: they are not JSON (RFC 8259), and a
NaN that reaches arithmetic or a comparison makes every check false.
"""

from __future__ import annotations

import itertools
import json
import re

TYPE_CHECKING = False  # not `typing`: the guest's agent imports this module
if TYPE_CHECKING:
    from collections.abc import Callable

#: Deeper than anything cocoon reads from a registry, an archive or a bundle
#: (an OCI config.json's seccomp rules are 6 deep, an image config 4), and far
#: from the interpreter's recursion limit even for code that walks the result.
DEFAULT_MAX_DEPTH = 64

#: Escaped characters go first: a string's quotes are then the only ones left.
#: (Pairs of backslashes before single ones, as the parser reads a run of them.)
_ESCAPES = (("\\\\", ""), ('\\"', ""))
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JSONError(ValueError):
    """The document is not JSON, or larger or deeper than its caller allows."""


def nesting_depth(text: str) -> int:
    """How deep ``text`` nests arrays and objects, in linear time and no recursion.

    Exact for valid JSON. For invalid JSON it never undercounts what the parser
    recurses through before it meets the first error: up to there, a string
    cut out here is one the parser reads as a string too, and an unterminated
    one runs to the end (where the parser fails inside it).
    """
    for escaped, gone in _ESCAPES:
        text = text.replace(escaped, gone)
    outside = "".join(text.split('"')[::2])  # every other piece is inside a string
    brackets = _NOT_BRACKET.sub("", outside)
    if not brackets:
        return 0
    return max(0, max(itertools.accumulate(map(_STEP.__getitem__, brackets))))


def _refuse_constant(name: str) -> object:
    raise JSONError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf - inf is nan; nan is never equal to anything
        raise JSONError("number out of range")
    return value


#: Made once, not per document as ``json.loads`` with hooks would: under TCG
#: every code path a new VM runs first is translated anew, and the agent's
#: first decode in a template's clone is on its restore's path.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
#: Its scanner (C where CPython has it): value and end from one position.
_SCAN: Callable[[str, int], tuple[object, int]] = getattr(_DECODER, "scan_once")  # noqa: B009


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> object:
    """Parse ``data`` after checking its size and nesting; JSONError for anything wrong."""
    if len(data) > max_bytes:
        raise JSONError(f"{len(data)} B, more than the {max_bytes} B allowed")
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode(json.detect_encoding(data), "surrogatepass")
        except (UnicodeDecodeError, LookupError):
            raise JSONError("not UTF-8 text") from None
    else:
        text = data
    # Cheap bound first: most documents have fewer brackets than the limit.
    if text.count("[") + text.count("{") > max_depth:
        depth = nesting_depth(text)
        if depth > max_depth:
            raise JSONError(f"nested {depth} deep, more than the {max_depth} allowed")
    try:
        # A compact document (ours, on the protocol) is one scan: the
        # decoder's regex for surrounding whitespace is for the rest.
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end == len(text):
            return value
        return _DECODER.decode(text)
    except JSONError:
        raise
    except (ValueError, RecursionError) as e:
        raise JSONError(_reason(e)) from None


def _reason(e: BaseException) -> str:
    """The parser's complaint without the input it quotes."""
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, RecursionError):
        return "nested too deep"
    return f"not valid JSON ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
