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
    from pathlib import Path

    from ..advisories import config_warnings
    from ..sync.credentials import refused_dotfiles

    warnings = config_warnings(cfg)
    # Not errors: the files stay on the host. Named now, before any sync copies the rest.
    refused = refused_dotfiles(cfg.dotfiles, Path.home())
    if json_output:
        ctx.emit_json({"valid": True, "config": cfg.to_json(),
                       "warnings": [w.as_dict() for w in warnings],
                       "dotfiles_refused": [{"path": "~/" + rel, "message": message}
                                            for rel, message in refused]})
        return
    for warning in warnings:
        ctx.err.print(f"mariner: warning: {warning}")
    for _rel, message in refused:
        ctx.err.print(f"mariner: warning: [dotfiles] {message}")
    ctx.err.print(f"{cfg.config_file}: valid (VM {cfg.name!r})")
