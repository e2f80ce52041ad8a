"""The `prep` command line: one thin Click command per stage; each parses options and calls a function."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import PrepError


class PrepGroup(click.Group):
    """Turns PrepError into one `error:` line and exit code 2, wherever a command raises it."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PrepError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=PrepGroup)
@click.version_option(__version__, prog_name="prep")
def main():
    """teranprep: image folder + captions -> region features -> splits -> trained TERAN."""


# Each stage's commands live in commands/<module>.py and attach themselves to `main` on import.
COMMAND_MODULES = ("extract", "detector", "splits", "train", "formats", "demo", "search")


def _load_commands():
    import importlib
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"teranprep.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"teranprep.commands.{name}":
                raise


_load_commands()

