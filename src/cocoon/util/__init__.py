"""Small helpers shared by host-side layers; only boundedjson is shipped to the guest
(guestassets.rootfs.AGENT_MODULES), for the agent's message decoder."""
