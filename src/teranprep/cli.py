"""The `prep` command line: one thin Click command per stage; each parses options and calls a function."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import PrepError, os_error_line


class PrepGroup(click.Group):
    """Turns PrepError (and file-system errors on a user's path) into one `error:` line and exit
    code 2, and SIGINT / SIGTERM into one line on what was kept and exit 130 / 143."""

    def invoke(self, ctx):
        from .interrupts import Interrupted, install_signal_handlers, interrupted_message, restore_signal_handlers
        before = install_signal_handlers()
        try:
            return super().invoke(ctx)
        except PrepError as exc:
            click.echo(f"error: {' '.join(str(exc).split())}", err=True)  # always one line
            sys.exit(2)
        except click.UsageError as exc:
            # A bad option value (--batch-size 0, -k 5000, ...) is refused at parse time, before
            # any work, in the same one-line form as every other error.
            command = exc.ctx.command_path if exc.ctx else "prep"
            click.echo(f"error: {' '.join(exc.format_message().split())} (see `{command} --help`)", err=True)
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
        finally:
            restore_signal_handlers(before)  # called as a library (tests, notebooks): leave no trace
            from .manifests.ownership import release_output_locks
            release_output_locks()  # the kernel would drop them at exit; a library caller goes on


@click.group(cls=PrepGroup)
@click.version_option(__version__, prog_name="prep")
def main():
    """teranprep: image folder + captions -> region features -> splits -> trained TERAN."""


class ShownDefault(click.Option):
    """An option whose default comes from a function (to keep heavy imports out of `prep`'s start)
    and is still shown as its value in --help, not as "(dynamic)"."""

    def get_default(self, ctx, call: bool = True):
        return super().get_default(ctx, call=True)


def quiet_option(command):
    """--quiet, meaning the same on every stage: errors (and warnings) and the final summary only."""
    return click.option("--quiet", is_flag=True,
                        help="Print only errors, warnings and the final summary line.")(command)


def stage_echo(quiet: bool):
    """The `echo` a stage gets: click.echo, or nothing with --quiet."""
    return (lambda *args, **kwargs: None) if quiet else click.echo


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

