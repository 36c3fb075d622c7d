"""Human sizes as docker spells them: 512, 64k, 256m, 1.5g (binary multiples)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*$", re.IGNORECASE)
_MULT = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r}: use e.g. 512m or 1g")
    return int(float(m.group(1)) * _MULT[m.group(2).lower()])
