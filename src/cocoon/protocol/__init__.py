"""The host<->guest wire format: one definition for both sides.

Stdlib only: this package runs inside the guest too.
"""
