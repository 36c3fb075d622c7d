"""Every kind of id cocoon accepts, defined once, each named for whose it is.

An id becomes a directory name, a socket name, a guest path or a hostname, so
each is refused early unless it matches its pattern here. They differ on
purpose, and each accepts exactly what it did where it was defined before:
cocoon makes its own container ids (hex) and sandbox ids (which also name a
VM's cgroup and hostname), while an OCI runtime's caller chooses its own and
runc allows a '+' in them. Each user raises its own error class with its own
words; what they share is which strings are ids.

In ``protocol/`` because the guest's message decoder checks ids too: this
module ships in the guest image, so it stays stdlib-only and cheap to import.
"""

from __future__ import annotations

import re

#: cocoon's own container ids (``cocoon run``, ``cocoon create``): 64 hex digits, as docker's.
CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")
#: Container names (``--name``), and the container and exec ids of agent
#: messages (they become paths in the guest): docker's name alphabet.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: Container ids chosen by an OCI runtime's caller (containerd, podman): runc's alphabet.
OCI_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
#: A pod member's record dir as its pod's monitor checks it: the OCI alphabet,
#: no length bound (``cocoon-runtime`` made the dir under an OCI_ID).
OCI_RECORD_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: Sandbox ids: also a VM's name, its cgroup's and its guest's hostname.
SANDBOX_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
