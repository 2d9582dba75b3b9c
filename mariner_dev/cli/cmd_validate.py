from __future__ import annotations

import typer

from ..errors import ConfigError
from .app import JsonOpt, ProjectOpt, app, context


@app.command("validate")
def validate(project: ProjectOpt = None, json_output: JsonOpt = False) -> None:
    """Check mariner.toml (and your per-user config) and show every problem."""
    ctx = context(project, json_output)
    try:
        cfg = ctx.load()
    except ConfigError as exc:
        if not json_output:
            raise
        errors = [p.as_dict() for p in exc.problems] or [
            {"file": None, "line": None, "column": None, "key": "", "message": exc.message}]
        ctx.emit_json({"valid": False, "errors": errors})
        raise typer.Exit(exc.exit_code) from None
    if json_output:
        ctx.emit_json({"valid": True, "config": cfg.to_json()})
    else:
        ctx.err.print(f"{cfg.config_file}: valid (VM {cfg.name!r})")
