"""Runtime state on disk: one locked dir per sandbox, written atomically."""
