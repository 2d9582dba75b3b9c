"""Getting into the guest: SSH connections, exec and shell, host-key trust, the per-VM agent.

Public API (what lifecycle commands call); importing this package is cheap, asyncssh is
imported only by the functions that open a connection:

- `GuestTarget`, `target_for(cfg, record)`: where the guest's sshd is and how to log in
  (bridge: 10.0.0.<cid>:22; user mode: 127.0.0.1:<record.ssh_port>).        [target]
- `tcp_reachable(target, timeout=1.0)`: a plain TCP connect, no SSH.          [target]
- `wait_for_ssh(target, timeout, pin, trust_new=False)`: retry with backoff until SSH
  authenticates; pin the host key on first success when `pin`; GuestUnreachable on timeout.
- `run_hook(target, command, cwd, env) -> int`: a shell command in a login environment,
  output streamed to ours, no stdin.
- `forget_host_key(name)`: drop the pin (destroy).                           [trust]
- `start_agent(cfg, record)`, `stop_agent(name)`, `agent_running(name)`.      [client, agent]
- `sshconfig.write_entry(cfg, record)`, `sshconfig.remove_entry(name)`,
  `sshconfig.ensure_include()` live in `mariner_dev.sshconfig`.

Internals: `command` (the remote command line), `session` (asyncssh), `agent` (the
background process), `client` (its light client), `dispatch` (agent or direct), `bridge`
(stdio<->vsock for ssh's ProxyCommand), `terminal` (raw mode, window size).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .target import GuestTarget

# Imported on first use (PEP 562), so that `mariner_dev.remote.<light module>` on the exec
# fast path does not pull in dataclasses, hashlib and the error classes.
_LAZY = {
    "GuestTarget": "target", "target_for": "target", "tcp_reachable": "target",
    "alias_for": "target", "forget_host_key": "trust", "HostKeyMismatch": "trust",
    "NotPinned": "trust", "agent_running": "client", "stop_agent": "client",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "GuestTarget", "target_for", "tcp_reachable", "wait_for_ssh", "run_hook", "alias_for",
    "forget_host_key", "start_agent", "stop_agent", "agent_running", "HostKeyMismatch",
    "NotPinned",
]


def wait_for_ssh(target: "GuestTarget", timeout: float, pin: bool, trust_new: bool = False) -> None:
    """Retry with backoff until an SSH handshake and login succeed; pin the key if `pin`."""
    import asyncio

    from .session import wait_until_ready

    asyncio.run(wait_until_ready(target, timeout, pin, trust_new))


def run_hook(target: "GuestTarget", command: str, cwd: str, env: dict,
             output_to_stderr: bool = True) -> int:
    """Run a shell command in the guest's login environment; stream its output; its status.

    Hook output goes to our stderr by default: stdout carries `up --json`'s one object."""
    import signal
    import sys

    from .command import ExecRequest, build_command
    from .session import run_direct

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    sys.stdout.flush()
    sys.stderr.flush()
    request = ExecRequest(build_command(None, workdir=cwd, env=dict(env), shell_command=command),
                          tty=False, stdin=False)
    out_fd = sys.stderr.fileno() if output_to_stderr else sys.stdout.fileno()
    # run_direct forwards these signals to the hook through asyncio, which leaves them at
    # their defaults afterwards: the caller's handlers (up's SIGTERM) are put back.
    saved = {signum: signal.getsignal(signum) for signum in forwarded}
    try:
        outcome = run_direct(target, request, fds=(None, out_fd, sys.stderr.fileno()))
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)
    if outcome.message:
        from ..termsafe import printable

        sys.stderr.write(f"mariner: {printable(outcome.message)}\n")
    return outcome.status


def start_agent(cfg, record) -> None:
    """Make sure the VM's agent runs (started by `up`; replaces a stale one). Never raises for
    an agent that cannot start: exec then connects directly."""
    from .client import AgentUnavailable, ensure_agent
    from .target import target_for

    try:
        ensure_agent(target_for(cfg, record), retry_ports=True)
    except AgentUnavailable:
        pass
