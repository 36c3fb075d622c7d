"""The numbers cocoon promises (SPECIFICATION.md), checked where they are measured.

Each bench script records what it measured against the promise it checks;
at the end it prints one table and exits 1 if any promise was broken. The
machines are shared and noisy, so a figure is only "broken" past a margin
(NOISE: 10 % on top of the limit; ratios are measured side by side in one
run, so most of the noise cancels). A promise the run did not measure (a
section skipped with --only) is listed as not checked, never as kept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

NOISE = 0.10


@dataclass
class Promise:
    name: str
    limit: float
    unit: str
    most: bool  # True: measured <= limit; False: measured >= limit
    measured: float | None = None

    def kept(self) -> bool | None:
        if self.measured is None:
            return None
        if self.most:
            return self.measured <= self.limit * (1 + NOISE)
        return self.measured >= self.limit * (1 - NOISE)


class Promises:
    def __init__(self) -> None:
        self.items: list[Promise] = []

    def at_most(self, name: str, limit: float, unit: str) -> Promise:
        p = Promise(name, limit, unit, most=True)
        self.items.append(p)
        return p

    def at_least(self, name: str, limit: float, unit: str) -> Promise:
        p = Promise(name, limit, unit, most=False)
        self.items.append(p)
        return p

    def finish(self) -> None:
        """Print the promises and exit 1 if one was broken (past NOISE)."""
        print(f"\nPromises (SPECIFICATION.md; broken only past {NOISE:.0%} of noise):")
        print("| promise | limit | measured | |\n|---|---|---|---|")
        broken = 0
        for p in self.items:
            kept = p.kept()
            word = {None: "not measured", True: "kept", False: "BROKEN"}[kept]
            broken += kept is False
            got = "" if p.measured is None else f"{p.measured:.3g} {p.unit}"
            sign = "<=" if p.most else ">="
            print(f"| {p.name} | {sign} {p.limit:g} {p.unit} | {got} | {word} |")
        if broken:
            print(f"{broken} promise(s) broken", file=sys.stderr)
            sys.exit(1)
