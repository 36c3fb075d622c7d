"""OCI runtime-spec types and defaults (the config.json side of containers)."""
