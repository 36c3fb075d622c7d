"""Host-side storage a sandbox owns: sized scratch block files."""
