"""`cocoon` command line: one module per group of verbs."""
