"""Fuzz targets: one module per decoder of untrusted bytes (run by fuzz/run.py).

A target module ``fuzz/targets/<name>.py`` defines:

- ``EXPECTED: tuple[type[BaseException], ...]``: the decoder's own errors, what
  it raises on purpose for bad input. Any other exception is a finding.
- ``def run(data: bytes) -> None``: feed ``data`` to the decoder the way
  production code does (in a temp dir from ``tempfile`` if it needs files:
  the runner points ``tempfile`` at a scratch dir it removes at the end).

and optionally:

- ``def seeds() -> list[bytes]``: seeds built in code, besides the files of
  ``fuzz/corpus/<name>/``;
- ``def mutate(data: bytes, rng: random.Random, pool: mutate.Pool) -> bytes | None``:
  a structure-aware mutation (fix lengths or digests up after an edit);
  ``None`` falls back to the generic mutator;
- ``TIMEOUT_S``, ``MEMORY_MIB``, ``MAX_INPUT``: per-target limits instead of
  the runner's; ``COVERAGE_MODULES``: stdlib modules to trace besides cocoon's
  own code (e.g. ``("tarfile",)``).

Modules whose names start with ``_`` are helpers, not targets. Importing a
target must have no side effects: the runner imports every one.
"""
