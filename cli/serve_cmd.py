"""CLI commands: serve, config-check, config-schema, echo."""

from __future__ import annotations

from pathlib import Path

import typer


def _load(config: Path | None, port: int | None, data_dir: Path | None, roles: str | None = None):
    from node.config import load_config, with_overrides

    cfg = load_config(config)
    return with_overrides(cfg, port=port, data_dir=data_dir, roles=roles)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("serve")
    def serve(
        config: Path = typer.Option(
            None,
            "--config",
            "-c",
            help="Node configuration (TOML); see config.example.toml. "
            "Without it: built-in defaults (AE MOLRE, port 11112 "
            "on 127.0.0.1, ./molre-data, demo checkpoint).",
        ),
        port: int = typer.Option(None, "--port", help="Override network.port."),
        data_dir: Path = typer.Option(None, "--data-dir", help="Override storage.data_dir."),
        roles: str = typer.Option(
            None,
            "--roles",
            help="Override node.roles: a comma-separated subset of "
            "receive,assemble,infer,dispatch (several nodes on one "
            "PostgreSQL database; docs/operations.md).",
        ),
    ) -> None:
        """Run the DICOM node: receive head CT, read it, send the SR back. Stops on SIGTERM."""
        from common.log import configure_logging
        from node.service import NodeService

        cfg = _load(config, port, data_dir, roles)
        configure_logging(json_output=cfg.logging.json, level=cfg.logging.level)
        raise typer.Exit(NodeService(cfg).run())

    @app.command("config-check")
    def config_check(
        config: Path = typer.Option(None, "--config", "-c", help="Configuration file to check."),
        show: bool = typer.Option(False, "--show", help="Print the effective configuration."),
    ) -> None:
        """Validate a configuration file (exit 2 with the offending key on error)."""
        import json

        from storage.db import mask_url

        cfg = _load(config, None, None)
        if show:
            shown = cfg.public_dict()  # never print a password, token or secret
            typer.echo(json.dumps(shown, indent=2))
        typer.echo(
            f"ok: {config or '<defaults>'} (AE {cfg.network.ae_title} on "
            f"{cfg.network.host}:{cfg.network.port}, {len(cfg.destinations)} "
            f"destination(s), database {mask_url(cfg.database_url)})"
        )

    @app.command("config-schema")
    def config_schema(
        keys: bool = typer.Option(
            False,
            "--keys",
            help="Print the markdown table of every key (the one in "
            "docs/configuration.md) instead of the JSON schema.",
        ),
    ) -> None:
        """Print the JSON schema of the configuration file (or the docs' key table)."""
        import json

        from node.config import json_schema, key_table

        typer.echo(key_table() if keys else json.dumps(json_schema(), indent=2))

    @app.command("echo")
    def echo_cmd(
        host: str = typer.Argument("127.0.0.1", help="Peer host."),
        port: int = typer.Argument(11112, help="Peer port."),
        called_ae: str = typer.Option("MOLRE", "--aec", help="Called AE title."),
        calling_ae: str = typer.Option("MOLRE-ECHO", "--aet", help="Calling AE title."),
    ) -> None:
        """C-ECHO a DICOM node (e.g. the node itself, or a destination from the config)."""
        from node.dicomnet import echo

        status = echo(host, port, called_ae, calling_ae=calling_ae)
        if status == 0:
            typer.echo(f"C-ECHO {called_ae}@{host}:{port}: success")
            return
        typer.echo(
            f"C-ECHO {called_ae}@{host}:{port}: "
            f"{'no association' if status is None else f'status 0x{status:04X}'}",
            err=True,
        )
        raise typer.Exit(1)
