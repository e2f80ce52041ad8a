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
        import os
        from .manifests.remote import CACHE_DIR_ENV, CACHE_GB_ENV, STORAGE_ENV, relabel
        environment = {name: os.environ.get(name) for name in (STORAGE_ENV, CACHE_DIR_ENV, CACHE_GB_ENV)}
        try:
            return super().invoke(ctx)
        except PrepError as exc:
            click.echo(relabel(f"error: {' '.join(str(exc).split())}"), err=True)  # always one line
            sys.exit(2)
        except click.UsageError as exc:
            # A bad option value (--batch-size 0, -k 5000, ...) is refused at parse time, before
            # any work, in the same one-line form as every other error.
            command = exc.ctx.command_path if exc.ctx else "prep"
            click.echo(f"error: {' '.join(exc.format_message().split())} (see `{command} --help`)", err=True)
            sys.exit(2)
        except (Interrupted, KeyboardInterrupt) as exc:
            line, code = interrupted_message(exc)
            click.echo(relabel(line), err=True)
            sys.exit(code)
        except OSError as exc:
            # A full disk, a read-only mount, a permission or a path that is a file: the user's
            # file system, named in one line (the stage has already kept what it completed).
            click.echo(relabel(f"error: {os_error_line(exc)}"), err=True)
            sys.exit(2)
        finally:
            restore_signal_handlers(before)  # called as a library (tests, notebooks): leave no trace
            for name, value in environment.items():  # --storage-options / --cache-* of this command only
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
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


def _set_storage(ctx, param, value):
    if value is not None:
        from .manifests.remote import parse_storage_options, set_storage_options
        try:
            set_storage_options(parse_storage_options(value))
        except PrepError as exc:
            raise click.BadParameter(str(exc).replace("--storage-options: ", ""), ctx, param) from None
    return value


def storage_option(command):
    """--storage-options JSON: how to reach URLs (s3://, gs://, ...) this command reads or writes."""
    return click.option(
        "--storage-options", callback=_set_storage, expose_value=False, metavar="JSON",
        help="fsspec options for URL inputs/outputs, e.g. '{\"endpoint_url\": \"http://host:9000\"}', "
             "'{\"profile\": \"NAME\"}' or '{\"anon\": true}'. Credentials otherwise come from the "
             "usual AWS_* variables and config files.")(command)


def _set_cache_dir(ctx, param, value):
    if value is not None:
        from .manifests.remote import set_cache
        set_cache(cache_dir=value)
    return value


def _set_cache_gb(ctx, param, value):
    if value is not None:
        if not value > 0:
            raise click.BadParameter("must be > 0", ctx, param)
        from .manifests.remote import set_cache
        set_cache(cache_gb=value)
    return value


def cache_options(command):
    """--cache-dir / --cache-gb: where features read from a URL are cached, and how much."""
    command = click.option("--cache-gb", type=float, callback=_set_cache_gb, expose_value=False,
                           help="Size limit of the shard cache for features at a URL (least recently "
                                "used shards are evicted; default 20).")(command)
    return click.option("--cache-dir", callback=_set_cache_dir, expose_value=False,
                        type=click.Path(file_okay=False),
                        help="Local cache for features read from a URL (default "
                             "~/.cache/teranprep/remote, or $TERANPREP_CACHE_DIR).")(command)


def stage_echo(quiet: bool):
    """The `echo` a stage gets: click.echo, or nothing with --quiet."""
    if quiet:
        return lambda *args, **kwargs: None
    from .manifests.remote import relabel

    def echo(message=None, *args, **kwargs):  # a folder at a URL is named by its URL, not its mirror
        return click.echo(relabel(message) if isinstance(message, str) else message, *args, **kwargs)
    return echo


def say(text: str) -> None:
    """A command's summary line on stdout, folders at URLs named by their URLs."""
    from .manifests.remote import relabel
    click.echo(relabel(text))


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

