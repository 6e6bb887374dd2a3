"""Entry point of `molre-node`.

Each area registers its commands from its own module (`register(app)`), so the CLI stays thin
and its parts can evolve independently. User-caused problems (`MolreError`) are printed as one
clear line on stderr with exit status 2 — never a traceback.
"""

from __future__ import annotations

import sys
from typing import Protocol, cast

import typer

from common import __version__
from common.errors import MolreError
from common.log import configure_logging

app = typer.Typer(
    name="molre-node",
    help="DICOM-native head-CT AI node with MoLRE adapters: serve, train, evaluate, audit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"molre-node {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_json: bool = typer.Option(False, "--log-json", help="Log one JSON object per line."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    configure_logging(json_output=log_json, level=log_level)


def _register_all() -> None:
    from cli import audit_cmd, data_cmd, models_cmd, serve_cmd, train_cmd

    for module in (serve_cmd, models_cmd, data_cmd, train_cmd, audit_cmd):
        module.register(app)
    from cli import labels_cmd  # report labels

    labels_cmd.register(app)
    from cli import dataset_cmd  # dataset pull from a PACS

    dataset_cmd.register(app)


_register_all()


def _click_error_types() -> tuple[type[BaseException], ...]:
    """Usage-error classes: typer >= 0.29 vendors its own click (typer._click)."""
    import click

    types: list[type[BaseException]] = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored

        types.append(vendored.ClickException)
    except ImportError:  # older typer uses the real click
        pass
    return tuple(types)


_CLICK_ERRORS = _click_error_types()


class _UsageError(Protocol):
    """What both ClickException classes (click's and typer's vendored one) offer."""

    exit_code: int

    def show(self) -> None: ...


def main() -> None:
    """Console-script entry: run the app, turning MolreError into a clean message."""
    try:
        # standalone_mode=False returns the exit code of typer.Exit instead of exiting.
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and not isinstance(rc, bool):
            sys.exit(rc)
    except MolreError as exc:
        from common.log import clean_text, get_logger, json_logging

        if json_logging():  # `serve` with JSON logging: stderr carries JSON lines only
            get_logger("cli").error(clean_text(f"error: {exc}", 2000))
        else:
            typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except _CLICK_ERRORS as exc:  # usage errors: one message, click's exit code (2)
        usage = cast(_UsageError, exc)
        usage.show()
        sys.exit(usage.exit_code)


if __name__ == "__main__":
    main()
