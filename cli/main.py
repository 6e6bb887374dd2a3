"""Entry point of `molre-node`.

Each area registers its commands from its own module (`register(app)`), so the CLI stays thin
and its parts can evolve independently. User-caused problems (`MolreError`) are printed as one
clear line on stderr with exit status 2 — never a traceback.
"""

from __future__ import annotations

import sys

import typer

from molre import __version__
from molre.errors import MolreError
from molre.log import configure_logging

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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    configure_logging(json_output=log_json, level=log_level)


def _register_all() -> None:
    from cli import audit_cmd, data_cmd, models_cmd, serve_cmd, train_cmd

    for module in (serve_cmd, models_cmd, data_cmd, train_cmd, audit_cmd):
        module.register(app)


_register_all()


def main() -> None:
    """Console-script entry: run the app, turning MolreError into a clean message."""
    try:
        app(standalone_mode=False)
    except MolreError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
