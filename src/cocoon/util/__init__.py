"""Small helpers shared by host-side layers (never imported by the agent)."""
