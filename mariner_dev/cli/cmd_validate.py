from __future__ import annotations

from ..errors import ConfigError
from .app import JsonOpt, ProjectOpt, app, context


@app.command("validate")
def validate(project: ProjectOpt = None, json_output: JsonOpt = False) -> None:
    """Check mariner.toml (and your per-user config) and show every problem.

    \b
    Examples:
      mariner validate
      mariner validate --json | jq .errors
    """
    from .app import emit_error

    ctx = context(project, json_output)
    try:
        cfg = ctx.load()
    except ConfigError as exc:
        if json_output:
            emit_error(exc, valid=False)
        raise
    from ..advisories import config_warnings

    warnings = config_warnings(cfg)
    if json_output:
        ctx.emit_json({"valid": True, "config": cfg.to_json(),
                       "warnings": [w.as_dict() for w in warnings]})
        return
    for warning in warnings:
        ctx.err.print(f"mariner: warning: {warning}")
    ctx.err.print(f"{cfg.config_file}: valid (VM {cfg.name!r})")
