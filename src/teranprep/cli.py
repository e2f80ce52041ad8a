"""The `prep` command line: one thin Click command per stage; each parses options and calls a function."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import PrepError


class PrepGroup(click.Group):
    """Turns PrepError (and file-system errors on a user's path) into one `error:` line and exit
    code 2, and SIGINT / SIGTERM into one line on what was kept and exit 130 / 143."""

    def invoke(self, ctx):
        from .interrupts import Interrupted, install_signal_handlers, interrupted_message
        install_signal_handlers()
        try:
            return super().invoke(ctx)
        except PrepError as exc:
            click.echo(f"error: {' '.join(str(exc).split())}", err=True)  # always one line
            sys.exit(2)
        except (Interrupted, KeyboardInterrupt) as exc:
            line, code = interrupted_message(exc)
            click.echo(line, err=True)
            sys.exit(code)
        except OSError as exc:
            # A full disk, a read-only mount, a permission or a path that is a file: the user's
            # file system, named in one line (the stage has already kept what it completed).
            click.echo(f"error: {os_error_line(exc)}", err=True)
            sys.exit(2)


def os_error_line(exc: OSError) -> str:
    import errno
    where = exc.filename or "a file"
    hint = {errno.ENOSPC: "free some space (completed work was kept) and run the command again",
            errno.EROFS: "the file system is read-only; choose a writable output folder",
            errno.EACCES: "permission denied; choose a folder you can write to",
            errno.EPERM: "permission denied; choose a folder you can write to",
            errno.ENOTDIR: "a part of this path is a file, not a folder",
            errno.EEXIST: "a file already stands there",
            errno.EISDIR: "a folder stands where a file is needed",
            errno.ENOENT: "no such file or folder"}.get(exc.errno, "check the path")
    return f"{where}: {exc.strerror or exc}; {hint}"


@click.group(cls=PrepGroup)
@click.version_option(__version__, prog_name="prep")
def main():
    """teranprep: image folder + captions -> region features -> splits -> trained TERAN."""


# Each stage's commands live in commands/<module>.py and attach themselves to `main` on import.
COMMAND_MODULES = ("extract", "detector", "splits", "train", "formats", "demo")


def _load_commands():
    import importlib
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"teranprep.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"teranprep.commands.{name}":
                raise


_load_commands()

