"""Run one exec/shell/sync request through the agent or directly, and record which path
served it.

`MARINER_AGENT=require` fails (exit 125) rather than fall back; `off` never uses an agent;
the default (`auto`) uses the agent, starting one on first use, and connects directly when no
agent can serve. Each served call appends `agent` or `direct` to `$MARINER_DEBUG_PATH_FILE`
(tests assert it), and `-v` says it on stderr.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # the exec fast path imports none of these
    from typing import Callable

    from .command import ExecRequest
    from .target import GuestTarget

AGENT_MODES = ("auto", "require", "off")


def _choice(variable: str, choices: tuple[str, ...]) -> str:
    """An environment variable that must be one of `choices` (the first is the default)."""
    value = os.environ.get(variable, "").strip().lower() or choices[0]
    if value not in choices:
        from ..errors import UsageError

        raise UsageError(f"{variable}={value!r} is not one of {', '.join(choices)}")
    return value


def agent_mode() -> str:
    return _choice("MARINER_AGENT", AGENT_MODES)


TRANSPORTS = ("auto", "tcp", "vsock")


def transport_mode() -> str:
    """MARINER_TRANSPORT=tcp|vsock|auto (default auto); anything else is bad usage."""
    return _choice("MARINER_TRANSPORT", TRANSPORTS)


def record_path(kind: str, verbose: bool = False, detail: str = "") -> None:
    debug_file = os.environ.get("MARINER_DEBUG_PATH_FILE")
    if debug_file:
        with open(debug_file, "a") as fh:
            fh.write(kind + "\n")
    if verbose:
        sys.stderr.write(f"mariner: served by {'the agent' if kind == 'agent' else 'a direct connection'}"
                         f"{' (' + detail + ')' if detail else ''}\n")
        sys.stderr.flush()


def execute(target: "GuestTarget", request: "ExecRequest", *, fds=(0, 1, 2),
            trust_new: bool = False, verbose: bool = False) -> int:
    """Run `request` on the guest; returns the exit status to pass through."""
    from . import client

    mode = agent_mode()
    transport_mode()  # a bad MARINER_TRANSPORT is refused before anything starts
    if trust_new:
        # Re-pin over a connection of our own; a running agent still trusts the old key.
        client.stop_agent(target.name)
    elif mode != "off":
        status = _via_agent(target, mode, verbose, lambda: client.run_exec(
            target, request, fds, on_ready=lambda: record_path("agent", verbose)))
        if status is not _DIRECT:
            return status
    from . import session
    from .target import GuestTarget
    from .terminal import raw_mode

    if not isinstance(target, GuestTarget):  # the fast path's cached stand-in
        target = GuestTarget.from_json(target.to_json())

    record_path("direct", verbose)
    with raw_mode(fds[0] if fds[0] is not None else 0,
                  enabled=request.tty and request.stdin and fds[0] is not None):
        outcome = session.run_direct(target, request, fds, trust_new=trust_new)
    if outcome.message:
        from ..termsafe import printable

        sys.stderr.write(f"mariner: {printable(outcome.message)}\n")
    return outcome.status


_DIRECT = object()   # _via_agent's answer: no agent can serve, connect directly


def _via_agent(target, mode: str, verbose: bool, serve, *, forwards: list | None = None,
               warn=None):
    """`serve()` through the agent, starting (or replacing) one on first use; _DIRECT when no
    agent can serve and `mode` allows a direct connection."""
    from . import client

    try:
        try:
            return serve()
        except client.AgentUnavailable:
            if not _guest_answers(target):
                # An agent started now would hold the [ports] forwards on the host for a VM
                # that is down, and only give up minutes later.
                raise client.AgentUnavailable(f"VM {target.name} does not answer SSH; is it "
                                             f"running? `mariner up` starts it") from None
            client.ensure_agent(target, forwards=forwards, warn=warn or _verbose_warn(verbose))
            return serve()
    except client.AgentUnavailable as exc:
        if mode == "require":
            from ..errors import GuestUnreachable

            raise GuestUnreachable(f"MARINER_AGENT=require, but the agent for VM "
                                   f"{target.name} cannot serve: {exc.reason}") from None
        if verbose:
            from ..termsafe import printable

            sys.stderr.write(f"mariner: agent unavailable ({printable(exc.reason)}); "
                             f"connecting directly\n")
    return _DIRECT


def _guest_answers(target) -> bool:
    """The guest's sshd sends its banner (a TCP connect, no SSH session)."""
    from .target import GuestTarget, tcp_reachable

    if not isinstance(target, GuestTarget):  # the fast path's cached stand-in
        target = GuestTarget.from_json(target.to_json())
    return tcp_reachable(target, timeout=1.0)


def _verbose_warn(verbose: bool):
    """Agent start-up warnings (a forward's port in use) on an exec's stderr only with -v:
    without it, stderr is the remote command's alone."""
    def warn(line: str) -> None:
        if verbose:
            from ..termsafe import printable

            sys.stderr.write(f"mariner: {printable(line)}\n")
    return warn


def sync(target: "GuestTarget", request: dict, direct: "Callable[[], dict]", *,
         forwards: list | None = None, verbose: bool = False,
         warn: "Callable[[str], None] | None" = None) -> dict:
    """Run a sync (request: {"spec", "dry_run"}) in the agent, else `direct()`; both return
    sync.outcome() JSON. The agent path imports no asyncssh.

    `forwards` is the project's `[ports] forward`, for an agent started here on first use.
    """
    from . import client

    mode = agent_mode()
    transport_mode()
    if mode != "off":
        result = _via_agent(target, mode, verbose, lambda: client.run_sync(
            target, request, on_ready=lambda: record_path("agent", verbose)),
            forwards=forwards, warn=warn)
        if result is not _DIRECT:
            return result
    record_path("direct", verbose)
    return direct()
