"""What the exec and soak benches stand on: a real sshd on 127.0.0.1 as the guest
(tests/support/guest_sshd.py) and a mariner project for it, in a throwaway MARINER_HOME, HOME
and runtime directory; the mariner command to time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

_ISOLATED = ("MARINER_HOME", "XDG_RUNTIME_DIR", "HOME")


@dataclass
class GuestProject:
    base: Path    # the scratch directory (removed at the end)
    env: dict     # the environment for mariner and ssh runs
    project: object  # tests/support/fixtures.Project: .dir, .name, .cfg, .record


@contextmanager
def guest_project(prefix: str, runtime_prefix: str) -> Iterator[GuestProject]:
    """A guest and a project for it, this process's MARINER_HOME, XDG_RUNTIME_DIR and HOME
    pointed at the scratch ones (`prefix`: of the scratch directory; `runtime_prefix`: of the
    runtime directory in /tmp, short for socket paths). At the end the project's agent and the
    guest are stopped and both directories removed."""
    from support.fixtures import make_project, start_guest, stop_guest

    base = Path(tempfile.mkdtemp(prefix=prefix))
    runtime = Path(tempfile.mkdtemp(prefix=runtime_prefix, dir="/tmp"))
    os.chmod(runtime, 0o700)
    env = dict(os.environ)
    env.update({"MARINER_HOME": str(base / "mariner-home"), "XDG_RUNTIME_DIR": str(runtime),
                "HOME": str(base / "home"), "PYTHONPATH": str(REPO)})
    # An installed mariner has compiled bytecode; this environment may forbid writing it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for key in ("MARINER_AGENT", "MARINER_DEBUG_PATH_FILE", "SSH_AUTH_SOCK"):
        env.pop(key, None)
    guest = start_guest(base / "guest")
    project = None
    try:
        project = make_project(guest, {k: env[k] for k in _ISOLATED})
        os.environ.update({k: env[k] for k in _ISOLATED})
        yield GuestProject(base, env, project)
    finally:
        if project is not None:
            try:
                from mariner_dev.remote.client import stop_agent

                stop_agent(project.name)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
        stop_guest(guest)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


def mariner_command() -> list[str]:
    """The installed `mariner` beside this Python, else `python -m mariner_dev`."""
    script = Path(sys.executable).with_name("mariner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mariner_dev"]
