"""`cocoon guest build|info`: the guest kernel and root image (our osbuilder)."""

from __future__ import annotations

import click

from cocoon.cli.main import State, cli
from cocoon.guestassets import cache, kernel, rootfs


@cli.group()
def guest() -> None:
    """Build and inspect guest assets."""


def _log(msg: str) -> None:
    click.echo(f"guest: {msg}", err=True)


@guest.command("build")
@click.option(
    "--kernel-source",
    type=click.Choice(["build", "debian-cloud"]),
    help="Override guest.kernel_source from the configuration.",
)
@click.pass_obj
def build(state: State, kernel_source: str | None) -> None:
    """Build (or find cached) the guest kernel and root image."""
    cfg = state.cfg
    if kernel_source:
        cfg.guest.kernel_source = kernel_source
    if cfg.guest.kernel_source == "build":
        k = kernel.build(cfg, _log)
    else:
        from cocoon.guestassets import cloudkernel

        k = cloudkernel.build(cfg, _log)
    cache.set_current(cfg, f"kernel-{cfg.guest.kernel_source}", k)
    img = rootfs.build(cfg, _log)
    cache.set_current(cfg, "image", img)
    click.echo(f"kernel {k}")
    click.echo(f"image  {img}")


@guest.command("info")
@click.pass_obj
def info(state: State) -> None:
    """Show the assets sandboxes boot now."""
    a = cache.resolve(state.cfg)
    click.echo(f"kernel {a.kernel} ({a.kernel.stat().st_size >> 10} KiB)")
    click.echo(f"image  {a.image} ({a.image.stat().st_size >> 10} KiB)")
