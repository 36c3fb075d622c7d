"""`cocoon-runtime`: the runc-compatible command line (one module per concern)."""
