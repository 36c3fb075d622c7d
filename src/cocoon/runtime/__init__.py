"""The container runtime library (our libcontainer): what the CLIs call."""
