"""`[dotfiles] repository` and `install`, as devcontainers does them, run in the guest.

Clone the repository (to `~/dotfiles` or `[dotfiles] target`), then run `install`, or else the
first of install.sh, install, bootstrap.sh, bootstrap, setup.sh, setup; with none of them,
symlink the repository's top-level dotfiles into ~. Re-run when the repository, the install
command or the target change, and when asked (`up` after a rebuild).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import MarinerError
from ..remote.command import quote
from .credentials import display
from .tree import check_rel

DEFAULT_SCRIPTS = ("install.sh", "install", "bootstrap.sh", "bootstrap", "setup.sh", "setup")
SKIP_LINKS = (".git", ".github", ".gitignore", ".gitmodules", ".gitattributes")
MARK = "@mariner "
OUTPUT_TAIL = 15


class RepositoryError(MarinerError):
    """Cloning the dotfiles repository or running its install failed in the guest."""


@dataclass(frozen=True)
class RepositorySettings:
    url: str
    install: str | None
    target: str                 # "~/dotfiles" or a path relative to the guest home
    timeout: int = 600          # seconds for the clone, and again for the install

    @property
    def target_rel(self) -> str:
        rel = self.target[2:] if self.target.startswith("~/") else self.target
        rel = rel.strip("/")
        if not check_rel(rel):
            raise RepositoryError(f"[dotfiles] target {self.target!r} must be a path under the "
                                  f"guest home, like \"~/dotfiles\"")
        return rel

    @property
    def fingerprint(self) -> str:
        blob = json.dumps([self.url, self.install, self.target])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _prelude(home: str, set_home: bool) -> str:
    lines = ["exec 2>&1", f"home={quote(home)}"]
    if set_home:
        lines.append('export HOME="$home"')
    return "\n".join(lines) + "\n"


def clone_script(settings: RepositorySettings, home: str, *, owned: bool, set_home: bool) -> str:
    """Clone, or update the clone that is there; exits 90+ with a message when it cannot."""
    return _prelude(home, set_home) + f"""\
target={quote(settings.target_rel)}
url={quote(settings.url)}
cd -- "$home" || {{ echo "cannot enter the guest home $home"; exit 90; }}
command -v git >/dev/null 2>&1 || {{ echo 'git is not installed in the VM (add "git" to [nix] packages)'; exit 91; }}
if [ -d "$target/.git" ]; then
  origin=$(git -C "$target" config --get remote.origin.url || true)
  if [ "$origin" = "$url" ]; then
    if git -C "$target" pull --ff-only -q; then echo "{MARK}updated"
    else echo "{MARK}warning: could not update ~/$target; using it as it is"; fi
    exit 0
  fi
  if [ {1 if owned else 0} = 1 ]; then
    aside="$target.replaced-$(date +%s)"
    mv -- "$target" "$aside" || exit 92
    echo "{MARK}moved the old clone aside to ~/$aside"
  else
    echo "~/$target already holds a clone of $origin; set [dotfiles] target elsewhere"; exit 92
  fi
elif [ -e "$target" ] || [ -L "$target" ]; then
  echo "~/$target exists in the guest and is not a git clone; set [dotfiles] target elsewhere"
  exit 92
fi
mkdir -p -- "$(dirname -- "$target")" || exit 92
git clone -q -- "$url" "$target" || exit 93
echo "{MARK}cloned"
"""


def install_script(settings: RepositorySettings, home: str, *, set_home: bool) -> str:
    """Run the install command, or the first default script, or link the dotfiles into ~."""
    candidates = " ".join(DEFAULT_SCRIPTS)
    skip = "|".join(SKIP_LINKS)
    return _prelude(home, set_home) + f"""\
cd -- "$home"/{quote(settings.target_rel)} || {{ echo "the clone is missing"; exit 90; }}
install={quote(settings.install or "")}
if [ -n "$install" ]; then
  if [ -f "$install" ]; then
    chmod +x -- "$install" 2>/dev/null
    echo "{MARK}ran $install"
    case $install in /*) exec "$install" ;; *) exec "./$install" ;; esac
  fi
  echo "{MARK}ran $install"
  exec bash -c "$install"
fi
for script in {candidates}; do
  if [ -f "$script" ]; then
    chmod +x -- "$script" 2>/dev/null
    echo "{MARK}ran $script"
    exec "./$script"
  fi
done
for f in .[!.]* ..?*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  case $f in {skip}) continue ;; esac
  if [ -L "$home/$f" ] || [ ! -e "$home/$f" ]; then
    ln -sfn -- "$PWD/$f" "$home/$f" && echo "{MARK}linked ~/$f"
  else
    echo "{MARK}kept ~/$f (the guest already has one)"
  fi
done
"""


async def _run(conn, script: str, timeout: float | None = None,
               what: str = "command") -> tuple[int, list[str]]:
    """Run `script` in the guest; its status and output lines. A run longer than `timeout`
    seconds is stopped (TERM, then KILL, to its process group) and is a RepositoryError."""
    import asyncio

    import asyncssh

    from ..remote.command import build_command

    command = build_command(None, workdir=None, env={}, shell_command=script)
    proc = await conn.create_process(command, encoding="utf-8", errors="replace")
    try:
        result = await proc.wait(timeout=timeout)
    except (asyncssh.TimeoutError, asyncio.TimeoutError):
        for sig in ("TERM", "KILL"):
            try:
                proc.send_signal(sig)
            except (asyncssh.Error, OSError, ValueError):
                pass
            await asyncio.sleep(0.5)
        proc.close()
        from ..paths import user_config_file

        raise RepositoryError(
            f"the dotfiles repository's {what} did not finish within {timeout:g} s and was "
            f"stopped", hint=f"if it needs longer, raise [dotfiles] timeout in "
                             f"{user_config_file()}") from None
    finally:
        proc.close()
    status = result.exit_status if result.exit_status is not None else 255
    if result.exit_signal:
        status = 255
    output = (result.stdout or "").splitlines()
    return status, output


def _tail(output: list[str]) -> str:
    lines = [line for line in output if not line.startswith(MARK)][-OUTPUT_TAIL:]
    return "\n".join(lines) if lines else "(no output)"


async def ensure_repository(conn, settings: RepositorySettings, home: str,
                            previous: dict | None, *, force: bool, dry_run: bool,
                            explicit_root: bool = False) -> tuple[dict | None, list[str]]:
    """Clone and install when needed; returns the new state for the manifest and report lines."""
    fresh = previous is None or previous.get("fingerprint") != settings.fingerprint
    if not (force or fresh):
        return previous, []
    where = f"~/{display(settings.target_rel)}"
    if dry_run:
        return previous, [f"would clone or update {settings.url} in {where} and run its install"]
    owned = previous is not None and previous.get("target") == settings.target
    status, output = await _run(conn, clone_script(settings, home, owned=owned,
                                                   set_home=explicit_root),
                                settings.timeout, f"clone of {settings.url} into {where}")
    if status != 0:
        raise RepositoryError(f"could not clone the dotfiles repository {settings.url} into "
                              f"{where}:\n{_tail(output)}")
    lines = [f"repository {line[len(MARK):]} {where}"
             if line[len(MARK):] in ("cloned", "updated") else line[len(MARK):]
             for line in output if line.startswith(MARK)]
    status, output = await _run(conn, install_script(settings, home, set_home=explicit_root),
                                settings.timeout, f"install in {where}")
    ran = [line[len(MARK):] for line in output if line.startswith(MARK)]
    if status != 0:
        what = ran[0] if ran else "the install"
        raise RepositoryError(f"the dotfiles install ({what} in {where}) exited with status "
                              f"{status}; its last lines:\n{_tail(output)}",
                              hint="fix it and run `mariner sync` (or `mariner up`) again")
    lines += [f"{line} in {where}" if line.startswith("ran ") else line for line in ran]
    state = {"url": settings.url, "install": settings.install, "target": settings.target,
             "fingerprint": settings.fingerprint}
    return state, lines
