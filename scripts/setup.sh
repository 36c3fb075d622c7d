#!/usr/bin/env bash
# cocoon set-up: everything a fresh Debian bookworm machine is missing, idempotent
# and cached. System packages (apt-get, only when one is missing), the Python
# package (editable, with test tools), and the guest kernel + root image
# (`cocoon guest build`, cached by content hash under /var/lib/cocoon).
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  qemu-system-x86 qemu-utils erofs-utils e2fsprogs crun busybox-static iproute2
  linux-source-6.1 bc bison flex libelf-dev libssl-dev kmod cpio make gcc
  python3.11-minimal libpython3.11-stdlib
  docker-registry skopeo umoci apache2-utils
  podman containerd runc runsc iperf3 iptables tini
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import cocoon, click, httpx, zstandard, rich, pytest, pytest_timeout, mypy, cryptography, google.protobuf, grpc_tools, mypy_protobuf, prometheus_client, kubernetes_validate, yaml, fastapi, uvicorn, croniter, schemathesis' 2>/dev/null \
   || [ "$("$PY" -c 'import cocoon, os; print(os.path.realpath(cocoon.__file__))' 2>/dev/null)" \
        != "$(realpath src/cocoon/__init__.py)" ]; then
  echo "setup: installing the cocoon Python package" >&2
  pip_args=(-q install -e '.[dev]')
  if ! "$PY" -m pip "${pip_args[@]}" 2>/dev/null; then
    "$PY" -m pip "${pip_args[@]}" --break-system-packages
  fi
fi

# Bytecode for every module, ahead: each `cocoon`/`cocoon-runtime` call is a
# new interpreter, and where PYTHONDONTWRITEBYTECODE is set (as on these
# machines) a module without a fresh .pyc is compiled again on every call:
# measured ~35 ms of a `cocoon run` with a few stale modules, more from a fresh
# clone. compileall skips what is already fresh.
"$PY" -m compileall -q src >/dev/null

# pyenv puts console scripts behind shims that exist only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi

# Both guest kernels: ours (built, the default) and Debian's cloud kernel (the
# no-build alternative; its .deb is fetched once, so apt needs its lists then).
"$PY" -m cocoon.cli guest build --kernel-source debian-cloud >&2 \
  || { apt-get update -q && "$PY" -m cocoon.cli guest build --kernel-source debian-cloud >&2; }
"$PY" -m cocoon.cli guest build >&2
# The default image, built offline from busybox-static: `cocoon run busybox ...`.
"$PY" -m cocoon.cli image default >&2
