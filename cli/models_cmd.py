"""CLI commands: backbones (issue 3)."""

from __future__ import annotations

import json
from typing import Optional

import typer


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("backbones")
    def backbones_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
        only: Optional[str] = typer.Option(None, "--only", help="Comma-separated backbone names (default: all)."),
        experts: int = typer.Option(6, "--experts", help="MoLRE experts K for the overhead column."),
        rank: int = typer.Option(8, "--rank", help="Rank r per expert (and of the LoRA column)."),
    ) -> None:
        """List the backbones: 2D/3D, parameters, feature size, MoLRE targets and overhead."""
        from molre.backbones import describe_backbone, get_spec, list_backbones

        names = list_backbones()
        if only:
            names = [n.strip() for n in only.split(",") if n.strip()]
            for n in names:
                get_spec(n)  # unknown name -> ConfigError listing the known ones
        rows = [describe_backbone(n, experts=experts, rank=rank) for n in names]
        if as_json:
            typer.echo(json.dumps({"experts": experts, "rank": rank, "backbones": rows}, indent=2))
            return
        header = ("name", "dims", "params", "feature", "recipe", f"MoLRE({experts},{rank})", f"LoRA r={rank}", "targets")
        table = []
        for r in rows:
            recipe = ", ".join(f"{k}={v}" for k, v in r["recipe"].items() if k != "name")
            recipe = f"{r['recipe']['name']} ({recipe})" if recipe else r["recipe"]["name"]
            if r["error"]:
                molre = lora = "n/a"
            else:
                molre = f"{_fmt_params(r['molre']['adapter_params'])} ({r['molre']['overhead_percent']:.2f}%)"
                lora = f"{_fmt_params(r['lora']['adapter_params'])} ({r['lora']['overhead_percent']:.2f}%)"
            n_layers = len(r["molre"]["layers"]) if r.get("molre") else 0
            targets = f"{n_layers} layer{'s' if n_layers != 1 else ''}" if r.get("molre") else "-"
            table.append((r["name"], f"{r['dims']}D", _fmt_params(r["params"]), str(r["feature_dim"]),
                          recipe, molre, lora, targets))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        typer.echo(line(header))
        typer.echo(line(["-" * w for w in widths]))
        for row in table:
            typer.echo(line(row))
        for r in rows:
            if r["error"]:
                typer.echo(f"note: {r['name']}: {r['error']}")
        typer.echo("Counts at random init (architecture only). Weights: local files only — "
                   "`--weights PATH` on train/evaluate; see docs/backbones.md.")
