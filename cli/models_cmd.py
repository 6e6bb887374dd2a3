"""CLI commands: backbones."""

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
        as_json: bool = typer.Option(
            False, "--json", help="Print one JSON document instead of a table."
        ),
        only: Optional[str] = typer.Option(
            None, "--only", help="Comma-separated backbone names (default: all)."
        ),
        experts: int = typer.Option(
            6, "--experts", help="MoLRE experts K for the overhead column."
        ),
        rank: int = typer.Option(8, "--rank", help="Rank r per expert (and of the LoRA column)."),
    ) -> None:
        """List the backbones: 2D/3D, parameters, feature size, adapter presets and their overhead."""
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
        header = (
            "name",
            "dims",
            "params",
            "feature",
            "recipe",
            "preset",
            f"MoLRE({experts},{rank})",
            f"LoRA r={rank}",
            "adapted",
        )
        table = []
        for r in rows:
            recipe = ", ".join(f"{k}={v}" for k, v in r["recipe"].items() if k != "name")
            recipe = f"{r['recipe']['name']} ({recipe})" if recipe else r["recipe"]["name"]
            first = (
                r["name"],
                f"{r['dims']}D",
                _fmt_params(r["params"]),
                str(r["feature_dim"]),
                recipe,
            )
            if r["error"]:
                table.append((*first, "-", "n/a", "n/a", "-"))
                continue
            for i, (preset, rep) in enumerate(r["presets"].items()):
                molre = f"{_fmt_params(rep['molre']['adapter_params'])} ({rep['molre']['overhead_percent']:.2f}%)"
                lora = f"{_fmt_params(rep['lora']['adapter_params'])} ({rep['lora']['overhead_percent']:.2f}%)"
                n_layers = len(rep["molre"]["layers"])
                label = preset + (" (default)" if preset == r["default_preset"] else "")
                table.append(
                    (
                        *(first if i == 0 else [""] * len(first)),
                        label,
                        molre,
                        lora,
                        f"{n_layers} layer{'s' if n_layers != 1 else ''}",
                    )
                )
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        typer.echo(line(header))
        typer.echo(line(["-" * w for w in widths]))
        for row in table:
            typer.echo(line(row))
        for r in rows:
            if r["error"]:
                typer.echo(f"note: {r['name']}: {r['error']}")
        typer.echo(
            "Counts at random init (architecture only); overhead = adapter parameters / "
            "backbone parameters. `train --preset light` picks the lighter placement. "
            "Weights: local files only — `--weights PATH` on train/evaluate/infer; see "
            "docs/backbones.md."
        )
