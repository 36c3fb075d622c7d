#!/usr/bin/env python3
"""Pull benchmark: cocoon pull (fetch + verify + unpack + erofs block image) of a
~100 MB multi-layer image from a local registry, beside `skopeo copy` +
`umoci unpack` of the same image, in one run. Prints seconds and the ratio.

Everything stays on 127.0.0.1: Debian's docker-registry with its own config
and storage, the image built here from generated files and pushed with skopeo.
Each side pays its process start-up and its own durability (skopeo fsyncs the
blobs; cocoon fsyncs the blobs and the erofs image; umoci syncs nothing); both
run quiet (`-q`: no progress bars even when the bench runs on a terminal); the
two alternate which goes first; cocoon's package is byte-compiled first, as an
installed one is.

    python3 bench/pull.py [--runs 3] [--mb 100] [--layers 5]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from promises import Promises  # bench/promises.py (the script's dir is on sys.path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = work / "registry.yml"
    cfg.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {work / 'registry'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    p = subprocess.Popen(
        ["docker-registry", "serve", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v2/"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return p, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise SystemExit("docker-registry did not start")


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def build_layout(dest: Path, total_mb: int, layers: int) -> None:
    """An OCI layout: `layers` gzip layers of half random, half text files."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    per = total_mb * (1 << 20) // layers
    descs, diff_ids = [], []
    rnd = os.urandom
    for i in range(layers):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for j in range(20):
                size = per // 20
                data = (
                    rnd(size) if j % 2 else (f"layer {i} file {j} line\n" * (size // 24)).encode()
                )
                ti = tarfile.TarInfo(f"data/l{i}/f{j}.bin")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        tar = raw.getvalue()
        gz = gzip.compress(tar, compresslevel=1, mtime=0)
        (blobs / sha(gz)[7:]).write_bytes(gz)
        diff_ids.append(sha(tar))
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(gz),
                "size": len(gz),
            }
        )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    (blobs / sha(config)[7:]).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": descs,
        }
    ).encode()
    (blobs / sha(manifest)[7:]).write_bytes(manifest)
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": sha(manifest),
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "latest"},
                    }
                ],
            }
        )
    )


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--layers", type=int, default=5)
    args = ap.parse_args()
    for tool in ("docker-registry", "skopeo", "umoci"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: run scripts/setup.sh")
    work = Path(tempfile.mkdtemp(prefix="cocoon-pullbench-"))
    reg, host = start_registry(work)
    try:
        build_layout(work / "layout", args.mb, args.layers)
        ref = f"{host}/bench/big:latest"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "-q",
                "--dest-tls-verify=false",
                f"oci:{work / 'layout'}:latest",
                f"docker://{ref}",
            ],
            check=True,
        )
        # cocoon as installed (pip byte-compiles): with PYTHONDONTWRITEBYTECODE set,
        # every timed run would otherwise compile cocoon's sources again.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import compileall, pathlib, cocoon;"
                "compileall.compile_dir(pathlib.Path(cocoon.__file__).parent, quiet=1)",
            ],
            check=True,
        )
        ours, peer = [], []

        def cocoon_pull(i: int) -> None:
            data = work / f"cocoon-data-{i}"
            env = dict(os.environ, COCOON_DATA_DIR=str(data))
            ours.append(timed([sys.executable, "-m", "cocoon.cli", "pull", "-q", ref], env=env))
            shutil.rmtree(data, ignore_errors=True)

        def skopeo_umoci(i: int) -> None:
            oci, bundle = work / f"oci-{i}", work / f"bundle-{i}"
            t = timed(
                [
                    "skopeo",
                    "copy",
                    "-q",
                    "--src-tls-verify=false",
                    f"docker://{ref}",
                    f"oci:{oci}:latest",
                ]
            )
            t += timed(["umoci", "unpack", "--image", f"{oci}:latest", str(bundle)])
            peer.append(t)
            shutil.rmtree(oci, ignore_errors=True)
            shutil.rmtree(bundle, ignore_errors=True)

        for i in range(args.runs):
            # Who goes first alternates: neither side always follows the other's writeback.
            for run in (cocoon_pull, skopeo_umoci) if i % 2 == 0 else (skopeo_umoci, cocoon_pull):
                run(i)
        mo, mp = statistics.median(ours), statistics.median(peer)
        print(
            f"pull of a {args.mb} MB, {args.layers}-layer image from a local registry "
            f"(median of {args.runs})"
        )
        print(f"{'path':<52} {'median s':>9} {'min':>7} {'max':>7}")
        print(
            f"{'cocoon pull (fetch+verify+unpack+erofs image)':<52} {mo:>9.2f} {min(ours):>7.2f} "
            f"{max(ours):>7.2f}"
        )
        print(f"{'skopeo copy + umoci unpack':<52} {mp:>9.2f} {min(peer):>7.2f} {max(peer):>7.2f}")
        print(f"ratio cocoon / (skopeo+umoci): {mo / mp:.2f}")
        promises = Promises()
        promises.at_most("pull: cocoon / (skopeo copy + umoci unpack)", 1.0, "x").measured = mo / mp
        promises.finish()
    finally:
        reg.kill()
        reg.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
