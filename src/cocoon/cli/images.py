"""`cocoon pull|images|rmi|load|login|logout|image inspect`: the image store."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from cocoon.cli.main import State, cli
from cocoon.errors import ImageError
from cocoon.images import auth, service
from cocoon.images.reference import parse
from cocoon.images.store import ImageStore


def _familiar_tag(tag: str) -> tuple[str, str]:
    try:
        ref = parse(tag)
    except ImageError:
        return tag, "<none>"
    name = ref.familiar.split("@")[0]
    repo, _, t = name.rpartition(":") if ref.tag else (name, "", "<none>")
    return repo, t or "<none>"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.3g}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1000
    return f"{n}B"


@cli.command()
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Pick from a multi-platform image.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, print only the image id.")
@click.argument("image")
@click.pass_obj
def pull(state: State, platform: str | None, quiet: bool, image: str) -> None:
    """Pull IMAGE from its registry into the local store (and build its block image)."""
    img = asyncio.run(
        service.pull(state.cfg, image, platform, progress=not quiet and sys.stderr.isatty())
    )
    if not quiet:
        digest = img.repo_digests[0].split("@")[1] if img.repo_digests else img.manifest_digest
        click.echo(f"Digest: {digest}", err=True)
    click.echo(img.id)
    # The process ends now: the interpreter's last garbage collection would walk
    # every object the pull made or imported (~50 ms for nothing). Frozen ones
    # are left alone; files and sockets are all closed by now.
    gc.freeze()


@cli.command("images")
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_obj
def images_cmd(state: State, quiet: bool, fmt: str) -> None:
    """List stored images."""
    imgs = ImageStore(state.cfg).list()
    if fmt == "json":
        click.echo(json.dumps([asdict(i) for i in imgs], indent=1))
        return
    if quiet:
        for i in imgs:
            click.echo(i.short_id)
        return
    click.echo(f"{'REPOSITORY':<40} {'TAG':<16} {'IMAGE ID':<13} {'CREATED':<20} SIZE")
    for i in imgs:
        created = (i.created or "")[:19].replace("T", " ") or "-"
        for tag in i.repo_tags or ["<none>:<none>"]:
            repo, t = _familiar_tag(tag) if tag != "<none>:<none>" else ("<none>", "<none>")
            click.echo(f"{repo:<40} {t:<16} {i.short_id:<13} {created:<20} {_human(i.size)}")


@cli.command()
@click.option("-f", "--force", is_flag=True, help="Remove even if tagged more than once.")
@click.argument("refs", nargs=-1, required=True)
@click.pass_obj
def rmi(state: State, force: bool, refs: tuple[str, ...]) -> None:
    """Remove images (untag; delete the image and blobs no other image uses)."""
    store = ImageStore(state.cfg)
    failed = False
    for r in refs:
        img = service.find(store, r)
        if img is None:
            click.echo(f"cocoon: no such image: {r}", err=True)
            failed = True
            continue
        key = service.canonical(r) if service.canonical(r) in img.repo_tags else img.id
        res = store.remove(key or img.id, force=force)
        for u in res.untagged:
            click.echo(f"Untagged: {u}")
        for d in res.deleted:
            click.echo(f"Deleted: {d}")
    if failed:
        sys.exit(1)


@cli.command()
@click.option("-i", "--input", "path", required=True, type=click.Path(dir_okay=False),
              help="A `docker save` or OCI image-layout tar archive.")  # fmt: skip
@click.pass_obj
def load(state: State, path: str) -> None:
    """Import images from an archive."""
    for img in service.load(state.cfg, Path(path)):
        names = ", ".join(img.repo_tags) or img.id
        click.echo(f"Loaded image: {names}")


@cli.group("image")
def image_group() -> None:
    """Image commands (inspect, ls, rm, pull)."""


@image_group.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@click.pass_obj
def inspect(state: State, refs: tuple[str, ...]) -> None:
    """Show the image record and its config as JSON."""
    store = ImageStore(state.cfg)
    out = []
    for r in refs:
        img = service.find(store, r)
        if img is None:
            raise ImageError(f"no such image: {r}")
        info = store.inspect(img.id)
        out.append({"Id": img.id, "Record": asdict(info.image), "Config": asdict(info.config)})
    click.echo(json.dumps(out, indent=1))


@image_group.command("default")
@click.pass_obj
def default_image(state: State) -> None:
    """Build the offline busybox image from Debian's busybox-static (idempotent)."""
    from cocoon.images.default import ensure_default_image

    img = ensure_default_image(state.cfg)
    click.echo(f"{', '.join(img.repo_tags)} {img.id}")


image_group.add_command(images_cmd, "ls")
image_group.add_command(rmi, "rm")
image_group.add_command(pull, "pull")


@cli.command()
@click.option("-u", "--username", required=True)
@click.option("-p", "--password", help="Prefer --password-stdin: argv is visible to others.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.argument("registry")
@click.pass_obj
def login(
    state: State, username: str, password: str | None, password_stdin: bool, registry: str
) -> None:
    """Check credentials against REGISTRY and store them (mode 0600)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise ImageError("no password: use --password-stdin (or -p)")
    host = asyncio.run(service.login(state.cfg, registry, username, password))
    click.echo(f"Login Succeeded ({host})")


@cli.command()
@click.argument("registry")
@click.pass_obj
def logout(state: State, registry: str) -> None:
    """Forget cocoon's stored credentials for REGISTRY."""
    if not auth.logout(state.cfg, registry):
        click.echo(f"cocoon: not logged in to {registry}", err=True)
        sys.exit(1)
    click.echo(f"Removing login credentials for {registry}")
