"""`mammonode model list|register|promote`: which models the node knows and which one serves.

Promotion is the only way the serving model changes (retraining registers a challenger but never
promotes it); the worker loads the promoted model for every score after it. Logic and auditing
live in :mod:`node.admin.registry`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from node.commands._admin import ConfigOption


def _label(d: dict[str, Any] | None) -> str:
    if d is None:
        return "none"
    return f"{d['name']} {d['version']} (sha256 {d['weights_sha256'][:12]})"


def list_command(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """Registered models and the bundled demo model; * marks the one that serves."""
    from node.admin.registry import list_models
    from node.commands._admin import load, open_session

    cfg = load(config)
    with open_session(cfg) as session:
        models = list_models(session)
    if json_output:
        for m in models:
            typer.echo(json.dumps(m.to_dict(), sort_keys=True))
        return
    typer.echo(f"  {'id':>4} {'name':<24} {'version':<20} {'sha256':<12}  path")
    for m in models:
        mark = "*" if m.active else " "
        ident = str(m.id) if m.id is not None else "-"
        extra = " (bundled)" if m.bundled else ""
        typer.echo(
            f"{mark} {ident:>4} {m.name:<24} {m.version:<20} {m.weights_sha256[:12]:<12}  {m.path}{extra}"
        )
    if cfg.model_dir is not None:
        typer.echo(f"note: the config's model_dir ({cfg.model_dir}) overrides the promoted model")


def register_command(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (model.json + weights).")],
    config: ConfigOption = None,
) -> None:
    """Check a model folder's weights against its manifest and register it (not promoted)."""
    from node.admin.registry import register_model
    from node.audit import cli_actor
    from node.commands._admin import load, open_session

    with open_session(load(config)) as session:
        row, new = register_model(session, model_dir, cli_actor())
        session.commit()
    state = "registered" if new else "already registered"
    typer.echo(
        f"{state}: {row.name} {row.version} (id {row.id}, sha256 {row.weights_sha256[:12]}) at {row.path}"
    )


def promote_command(
    model: Annotated[
        str, typer.Argument(help="Model folder, bundled, NAME, NAME:VERSION or a weights SHA-256 prefix.")
    ],
    config: ConfigOption = None,
) -> None:
    """Make one model the serving model; every score after this names it."""
    from node.admin.registry import promote_model
    from node.audit import cli_actor
    from node.commands._admin import load, open_session

    cfg = load(config)
    with open_session(cfg) as session:
        result = promote_model(session, model, cli_actor())
        session.commit()
    if not result.changed:
        typer.echo(f"already serving {_label(result.new)}; nothing changed")
        return
    typer.echo(f"serving model: {_label(result.old)} -> {_label(result.new)}")
    if cfg.model_dir is not None:
        typer.echo(f"note: the config's model_dir ({cfg.model_dir}) still overrides the promoted model")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Models: list, register, promote the serving one.", no_args_is_help=True)
    group.command("list")(list_command)
    group.command("register")(register_command)
    group.command("promote")(promote_command)
    app.add_typer(group, name="model")
