"""A VM's life on the host: up (create, update, start, wait, hooks), down, destroy, status, list.

Only `up`, `down` and `destroy` take the VM's lock. Every host command goes through the host
backend; every guest interaction through `remote`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import paths
from .errors import GuestUnreachable, HostError, HostUnavailable, MarinerError, OwnershipError
from .fsutil import LockBusy, file_lock
from .host.backend import HostBackend, HostVmStatus
from .model import ProjectConfig
from .state import Registry, VmRecord, forget_vm_files, stop_attached, vm_lock_file

Progress = Callable[[str], None]

STATES = ("absent", "stopped", "starting", "running", "failed")
# What status and list say when the host cannot be asked (HostBackend.preflight failed).
UNKNOWN = "unknown"


def _noop(_: str) -> None:
    pass


def default_backend() -> HostBackend:
    """The host backend for this user on this host (host/choice.py decides)."""
    from .host import choice

    return choice.make(choice.choose(choice.user_setting()).name)


class VmLock:
    """The per-VM lock that up/down/destroy hold, waiting or failing fast."""

    def __init__(self, name: str, *, wait: bool, progress: Progress = _noop):
        self.name = name
        self.wait = wait
        self.progress = progress
        self._cm = None

    def __enter__(self):
        paths.ensure_private_dir(paths.mariner_home())
        self._cm = file_lock(vm_lock_file(self.name), wait=self.wait,
                             what=f"VM {self.name!r}",
                             on_wait=lambda: self.progress(
                                 f"waiting for another mariner command on VM {self.name}"))
        try:
            return self._cm.__enter__()
        except LockBusy:
            raise MarinerError(f"another mariner command is working on VM {self.name!r}; "
                               f"wait for it to finish and try again") from None

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@dataclass
class UpResult:
    name: str
    state: str
    address: str | None
    ssh_port: int | None
    user: str
    workspace: str
    created: bool = False
    updated: bool = False
    started: bool = False
    restart_pending: bool = False
    hook_failed: str | None = None
    hook_exit: int | None = None
    messages: list[str] = field(default_factory=list)
    # project files the host runs, changed since `mariner trust` (tripwire.Change.to_json)
    tripwire: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        data = {"outcome": "error" if self.hook_failed else "success", "name": self.name,
                "state": self.state, "address": self.address, "ssh_port": self.ssh_port,
                "user": self.user, "workspace": self.workspace, "created": self.created,
                "updated": self.updated, "started": self.started,
                "restart_pending": self.restart_pending, "tripwire": self.tripwire}
        if self.hook_failed:
            data["hook"] = self.hook_failed
            data["hook_exit"] = self.hook_exit
            data["message"] = f"{self.hook_failed} hook exited with status {self.hook_exit}"
        return data


class HookFailed(MarinerError):
    def __init__(self, result: UpResult):
        super().__init__(f"the {result.hook_failed} hook exited with status {result.hook_exit}; "
                         f"VM {result.name!r} is running: fix it and run `mariner up` again")
        self.result = result


def _update_record(registry: Registry, name: str, **changes) -> VmRecord:
    with registry.transaction() as vms:
        record = vms[name]
        for key, value in changes.items():
            setattr(record, key, value)
        return record


def up(cfg: ProjectConfig, *, timeout: float = 180.0, restart: bool = True,
       wait_lock: bool = True, backend: HostBackend | None = None,
       progress: Progress = _noop, confirm: "approval.Confirm | None" = None) -> UpResult:
    """Bring the project's VM to running with its current config; idempotent.

    What acts on the host must be approved first (approval.gate): `confirm` asks a person,
    else an unapproved change raises approval.NotApproved before any host command."""
    from . import approval, remote, tripwire
    from .allocation import check_ownership, reserve
    from .drift import settle
    from .nixrender import read_host_inputs, write_flake
    from .project import render_for

    backend = backend or default_backend()
    registry = Registry()
    progress("checking the configuration")
    paths.ensure_private_dir(paths.mariner_home())   # where the approval is: say if unusable
    # One read of the module files and share paths: the bytes approved are those rendered.
    inputs = read_host_inputs(cfg)
    check_ownership(cfg, registry.get(cfg.name))   # another project's name: say that first
    # Before any host command (the preflight runs systemctl): nothing unapproved acts there.
    approval.gate(cfg, inputs, confirm)
    backend.preflight()  # before anything is reserved: a host that cannot run VMs claims no name
    with VmLock(cfg.name, wait=wait_lock, progress=progress):
        # Before the VM first boots (post_create runs repository code): what the host runs
        # from the project is recorded once; only `mariner trust` moves it afterwards.
        tripwire.record_baseline(str(cfg.project_dir))
        file_changes = tripwire.changes(str(cfg.project_dir)) or []
        record = reserve(cfg, registry)
        host = backend.status(cfg.name)
        refuse_foreign(cfg.name, host, record, "rebuild or start")
        # An existing VM keeps what cannot apply to it (disk sizes, an old default).
        settled = settle(cfg, record.built_config if host.exists else None)
        flake = render_for(cfg, record, inputs, built=host.exists)
        flake_dir = write_flake(flake, paths.default_flake_dir(cfg.name))
        record = _update_record(registry, cfg.name, flake_dir=str(flake_dir))
        address, port = record.ssh_endpoint
        result = UpResult(name=cfg.name, state="starting", address=address,
                          ssh_port=record.ssh_port, user=cfg.vm.user,
                          workspace=cfg.workspace_mount,
                          tripwire=[c.to_json() for c in file_changes],
                          messages=[f"tripwire: {c.line()}" for c in file_changes]
                          + list(settled.notes))
        if not host.exists:
            progress(f"building VM {cfg.name} (microvm -c)")
            try:
                backend.create(cfg.name, flake_dir)
            except HostError:
                # An interrupted `up` under sudo leaves its `microvm -c` running (sudo cannot
                # pass on the SIGKILL); when that one finished first, the VM is ours already.
                host = backend.status(cfg.name)
                if not host.exists or foreign_owner(cfg.name, host, record) is not None:
                    raise
                progress(f"VM {cfg.name} was created meanwhile; rebuilding it (microvm -u)")
                backend.update(cfg.name)
            record = _update_record(registry, cfg.name, created=True, built_hash=flake.hash,
                                    built_config=flake.metadata["config"], restart_pending=False,
                                    post_create_done=False, dotfiles_hash=None)
            result.created = True
            host = backend.status(cfg.name)
        elif record.built_hash != flake.hash:
            progress(f"rebuilding VM {cfg.name} ({backend.name} backend)")
            backend.update(cfg.name)
            result.updated = True
            result.messages.extend(settled.warnings)
            # Recorded before the restart, so that an interrupted `up` (or one with
            # --no-restart) leaves the restart for the next `up` to do.
            record = _update_record(registry, cfg.name, created=True, built_hash=flake.hash,
                                    built_config=flake.metadata["config"],
                                    restart_pending=host.running, dotfiles_hash=None)
            host = backend.status(cfg.name)
        if record.restart_pending and host.running and restart:
            progress(f"restarting VM {cfg.name}")
            _stop_agent(cfg.name)
            _update_record(registry, cfg.name, post_start_pending=True)
            _start(cfg, backend, registry, progress, restart=True, record=record, result=result,
                   inputs=inputs)
            result.started = True
            record = _update_record(registry, cfg.name, restart_pending=False)
            host = backend.status(cfg.name)
        if not host.running and host.unit != "activating":
            progress(f"starting VM {cfg.name}")
            if host.unit == "failed":
                _stop_agent(cfg.name)
            _update_record(registry, cfg.name, post_start_pending=True)
            _start(cfg, backend, registry, progress, restart=False, record=record,
                   result=result, inputs=inputs)
            result.started = True
            record = _update_record(registry, cfg.name, restart_pending=False)
        result.restart_pending = record.restart_pending
        target = remote.target_for(cfg, record)
        fresh_boot = result.started or result.created
        # An `up` interrupted before the first handshake left the VM running with no key
        # pinned: the wait (which pins) is not skipped then.
        if fresh_boot or not _pinned(target) or not remote.tcp_reachable(target, timeout=1.0):
            try:
                _wait_for_guest(cfg, backend, target, timeout, progress, cid=record.cid)
            except CidTaken as taken:
                # vsock cids are global to the kernel: another user's VM (or one mariner did
                # not create) started with ours since it was allocated. Move, once.
                record = _move_cid(cfg, registry, backend, record, taken.holder, result,
                                   progress, inputs)
                _update_record(registry, cfg.name, post_start_pending=True)
                backend.start(cfg.name)
                target = remote.target_for(cfg, record)
                result.address, result.ssh_port = record.ssh_endpoint[0], record.ssh_port
                _wait_for_guest(cfg, backend, target, timeout, progress, cid=record.cid)
        result.state = "running"
        _write_ssh_config(cfg, record, result)
        # Cheap when the agent runs (one ping); replaces one that holds another forward list.
        try:
            remote.start_agent(cfg, record)
        except MarinerError as exc:  # exec falls back to a direct connection
            result.messages.append(f"background agent not started: {exc}")
        _after_boot(cfg, registry, record, target, result, fresh_boot, progress)
        return result


class CidTaken(MarinerError):
    """The VM's vsock cid is held by another running VM on this host."""

    def __init__(self, name: str, cid: int, holder: str):
        super().__init__(f"VM {name!r} could not start: its vsock cid {cid} is taken by VM "
                         f"{holder!r} on this host")
        self.cid = cid
        self.holder = holder


def _move_cid(cfg: ProjectConfig, registry: Registry, backend: HostBackend, record: VmRecord,
              holder: str, result: UpResult, progress: Progress, inputs) -> VmRecord:
    """Give the VM another cid than the one `holder` runs with, rebuild it, and say so."""
    from .allocation import reserve
    from .nixrender import write_flake
    from .project import render_for

    old = record.cid
    progress(f"vsock cid {old} is taken by VM {holder} on this host; choosing another")
    if backend.status(cfg.name).unit != "inactive":
        backend.stop(cfg.name)   # a failed start may be looping in systemd's auto-restart
    record = reserve(cfg, registry, taken={old: holder})
    flake = render_for(cfg, record, inputs)   # the approved bytes, not a second read
    write_flake(flake, paths.default_flake_dir(cfg.name))
    progress(f"rebuilding VM {cfg.name} with cid {record.cid} (microvm -u)")
    backend.update(cfg.name)
    record = _update_record(registry, cfg.name, built_hash=flake.hash,
                            built_config=flake.metadata["config"], restart_pending=False)
    result.updated = True
    result.messages.append(f"vsock cid {old} was taken by VM {holder!r} on this host: VM "
                           f"{cfg.name} now uses cid {record.cid}")
    return record


def foreign_owner(name: str, host: HostVmStatus, record: VmRecord | None) -> str | None:
    """Why the VM `name` that exists on the host is not this user's, or None when its `flake`
    file points at this user's flake directory. A stale registry record (the VM was removed
    and another user created one with the same name) must never lead to another user's VM
    being rebuilt, restarted, stopped or deleted."""
    if not host.exists:
        return None
    ours = {f"path:{paths.default_flake_dir(name)}"}
    if record is not None and record.flake_dir:
        ours.add(f"path:{record.flake_dir}")
    if host.flakeref in ours:
        return None
    built = f"built from {host.flakeref}" if host.flakeref else "not built from a flake"
    return (f"VM {name!r} on this host is {built}, not from your flake "
            f"{paths.default_flake_dir(name)}: it belongs to another user (or another "
            f"MARINER_HOME)")


def refuse_foreign(name: str, host: HostVmStatus, record: VmRecord | None, verb: str) -> None:
    problem = foreign_owner(name, host, record)
    if problem is not None:
        raise OwnershipError(f"{problem}; mariner does not {verb} it", exit_code=2,
                             hint=f"`mariner destroy` drops your stale record of it; then set "
                                  f"a different [vm] name")


def _pinned(target) -> bool:
    from .remote.trust import pinned_keys

    return bool(pinned_keys(target.known_hosts, target.alias))


def _start(cfg: ProjectConfig, backend: HostBackend, registry: Registry, progress: Progress,
           *, restart: bool, record: VmRecord, result: UpResult, inputs) -> None:
    """Start (or restart) the VM. When the backend sees at once that another VM on the host,
    one mariner cannot see (another user's, in runner mode), holds the vsock cid, move it
    (_move_cid) and start again."""
    from .host.backend import VsockCidInUse

    for _ in range(3):
        try:
            backend.restart(cfg.name) if restart else backend.start(cfg.name)
            return
        except VsockCidInUse:
            if cfg.vm.cid is not None:
                raise
            record = _move_cid(cfg, registry, backend, record, "another VM on this host",
                               result, progress, inputs)
            restart = False  # it did not start
    raise MarinerError(f"VM {cfg.name!r} could not start: every vsock cid tried is held by "
                       f"another VM on this host", hint="set [vm] cid to a free one")




def _stop_agent(name: str) -> None:
    from . import remote

    remote.stop_agent(name)


def _wait_for_guest(cfg: ProjectConfig, backend: HostBackend, target, timeout: float,
                    progress: Progress, cid: int | None = None) -> None:
    """Wait until SSH answers (pinning the host key on first contact), or explain why not.
    A start that failed because another running VM holds the cid raises CidTaken."""
    from . import remote
    from .allocation import running_with_cid

    progress(f"waiting for SSH on {target.describe()}")
    deadline = time.monotonic() + timeout
    while True:
        host = backend.status(cfg.name)
        down = host.unit == "failed" or (host.unit == "inactive" and host.exists)
        if cid is not None and (down or host.substate == "auto-restart"):
            holder = running_with_cid(cid, cfg.name)
            if holder is not None:
                raise CidTaken(cfg.name, cid, holder)
        if down:
            tail = "\n".join(backend.log_tail(cfg.name, 15))
            raise MarinerError(f"VM {cfg.name!r} stopped while booting ({host.unit}); "
                               f"last lines of its log:\n{tail}",
                               hint="`mariner logs` shows the whole log")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tail = "\n".join(backend.log_tail(cfg.name, 15))
            raise MarinerError(f"VM {cfg.name!r} did not answer SSH on {target.describe()} "
                               f"within {timeout:g} s; last lines of its log:\n{tail}",
                               hint="`mariner logs -f` follows the boot; `mariner up --timeout "
                                    "N` waits longer")
        try:
            remote.wait_for_ssh(target, timeout=min(remaining, 5.0), pin=True)
            return
        except remote.HostKeyMismatch:
            raise
        except GuestUnreachable:
            continue


def _write_ssh_config(cfg: ProjectConfig, record: VmRecord, result: UpResult) -> None:
    from . import sshconfig

    sshconfig.write_entry(cfg, record)
    note = sshconfig.ensure_include()
    if note:
        result.messages.append(note)


def _after_boot(cfg: ProjectConfig, registry: Registry, record: VmRecord, target,
                result: UpResult, fresh_boot: bool, progress: Progress) -> None:
    """Dotfiles on first boot and after a rebuild; post_create until it succeeds; post_start."""
    if cfg.dotfiles.files or cfg.dotfiles.repository:
        from .sync import config_fingerprint, sync_dotfiles

        # After a rebuild the hash is reset; a changed [dotfiles] changes the fingerprint.
        if record.dotfiles_hash != config_fingerprint(cfg):
            progress("syncing dotfiles")
            report = sync_dotfiles(cfg, record)
            result.messages.extend(report.warnings)
            record = _update_record(registry, cfg.name, dotfiles_hash=report.fingerprint)
    elif record.dotfiles_hash is None:
        record = _update_record(registry, cfg.name, dotfiles_hash="none")
    env = cfg.env_dict
    if cfg.hooks.post_create and not record.post_create_done:
        _run_hook(target, cfg, "post_create", cfg.hooks.post_create, env, result, progress)
        record = _update_record(registry, cfg.name, post_create_done=True)
    elif not cfg.hooks.post_create and not record.post_create_done:
        record = _update_record(registry, cfg.name, post_create_done=True)
    # Pending from the start until it succeeds: an `up` interrupted after starting the VM, or
    # whose post_start failed, leaves it for the next `up`.
    if cfg.hooks.post_start and (fresh_boot or record.post_start_pending):
        _run_hook(target, cfg, "post_start", cfg.hooks.post_start, env, result, progress)
    if record.post_start_pending:
        _update_record(registry, cfg.name, post_start_pending=False)


def _run_hook(target, cfg: ProjectConfig, hook: str, command: str, env: dict,
              result: UpResult, progress: Progress) -> None:
    """Run the [hooks] `hook` (its `command`) in the guest's workspace; an interrupted or
    failed one ends the `up` (HookFailed carries which hook and its exit status)."""
    from . import remote

    progress(f"running the {hook} hook")
    status = remote.run_hook(target, command, cwd=cfg.workspace_mount, env=env)
    _interrupted_hook(hook, status)
    if status != 0:
        result.hook_failed, result.hook_exit = hook, status
        raise HookFailed(result)


def _interrupted_hook(hook: str, status: int) -> None:
    """A hook ended by the Ctrl-C or SIGTERM that mariner passed on to it (run_hook forwards
    them to the guest) is an interrupted `up`, not a hook to fix: it runs again next time."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        if status == 128 + signum:
            raise MarinerError(f"the {hook} hook was interrupted ({signal.Signals(signum).name}); "
                               f"`mariner up` runs it again", exit_code=status)


def _owned_record(cfg: ProjectConfig, registry: Registry, verb: str = "report on",
                  foreign_ok: bool = True) -> VmRecord | None:
    """The VM's record when mariner created it for this project; None when there is none.
    Another project's VM is refused; so is one mariner did not create unless `foreign_ok`."""
    from .allocation import check_ownership

    record = registry.get(cfg.name)
    check_ownership(cfg, record, verb=verb, foreign_ok=foreign_ok)
    return record


def down(cfg: ProjectConfig, *, backend: HostBackend | None = None,
         wait_lock: bool = True, progress: Progress = _noop) -> bool:
    """Stop the VM (and its agent and attached processes); False when it was not running."""
    backend = backend or default_backend()
    registry = Registry()
    with VmLock(cfg.name, wait=wait_lock, progress=progress):
        record = _owned_record(cfg, registry, "stop", foreign_ok=False)
        if record is None:
            return False
        backend.preflight()
        host = backend.status(cfg.name)
        refuse_foreign(cfg.name, host, record, "stop")
        _stop_agent(cfg.name)
        stop_attached(cfg.name)
        if host.unit == "inactive":
            return False
        progress(f"stopping VM {cfg.name}")
        backend.stop(cfg.name, wait=True)
        _update_record(registry, cfg.name, restart_pending=False)
        return True


@dataclass
class DestroyResult:
    name: str
    removed: bool                 # mariner had a record of the VM and removed it
    host_removed: bool = False    # the VM was removed from the host
    host_error: HostError | None = None   # why the host part failed (with force)
    notes: list[str] = field(default_factory=list)   # what was left, and why


def destroy(cfg: ProjectConfig, *, backend: HostBackend | None = None, force: bool = False,
            progress: Progress = _noop) -> DestroyResult:
    """Remove the project's VM, its volumes, registry entry, ssh-config entry and pinned key."""
    return destroy_vm(cfg.name, project_dir=cfg.project_dir, config_file=cfg.config_file,
                      backend=backend, force=force, progress=progress)


def destroy_vm(name: str, *, project_dir: Path | None = None, config_file: Path | None = None,
               backend: HostBackend | None = None, force: bool = False,
               progress: Progress = _noop) -> DestroyResult:
    """Remove VM `name` and mariner's records of it. With `project_dir`, only that project's
    VM (else any VM in this user's registry: `destroy --name`, for a project moved or gone).

    A VM on the host that another user's flake built is left alone: only this user's stale
    record goes. With `force`, a host that cannot be reached does not keep mariner's own
    records: they go, and the notes say what is left on the host."""
    from .allocation import check_claim

    backend = backend or default_backend()
    registry = Registry()
    with VmLock(name, wait=False, progress=progress):
        record = check_claim(name, registry.get(name), project_dir=project_dir,
                             config_file=config_file, verb="destroy", host_dir=backend.vms_dir)
        if record is None:
            return DestroyResult(name=name, removed=False)
        result = DestroyResult(name=name, removed=True)
        try:
            backend.preflight()
            host = backend.status(name)
            problem = foreign_owner(name, host, record)
            if problem is not None:
                result.notes.append(f"{problem}: it was left alone, and only your own record "
                                    f"of it was removed (use another [vm] name)")
            else:
                _stop_agent(name)
                stop_attached(name)
                progress(f"destroying VM {name}")
                backend.destroy(name)
                result.host_removed = True
        except HostError as exc:
            keep = ("mariner's records of the VM are kept; `mariner destroy --force` removes "
                    "them even when the host cannot be reached")
            if not force:
                exc.hint = f"{exc.hint}; {keep}" if exc.hint else keep
                raise
            result.host_error = exc
            result.notes.append(f"mariner's own records of VM {name} were removed, but not the "
                                f"VM on the host; once the host works, remove what is left "
                                f"there: {backend_leftovers(name)}")
        result.notes.extend(forget_vm_files(name))
        with registry.transaction() as vms:
            vms.pop(name, None)
        return result


def backend_leftovers(name: str) -> str:
    """Where a VM the host could not destroy leaves its state (for the user's next step)."""
    return (f"`systemctl stop microvm@{name}` and `rm -rf {paths.microvms_dir() / name}` "
            f"as root")


@dataclass
class VmStatus:
    name: str
    state: str
    project: str | None
    managed: bool
    outdated: bool = False
    changed_keys: list[str] = field(default_factory=list)
    restart_pending: bool = False
    address: str | None = None
    ssh_port: int | None = None
    cid: int | None = None
    uptime: float | None = None
    # `[ports] forward` as the agent holds them: {"forward", "host", "guest", "state"
    # (listening | failed | not held), "error", "active", "total", "last_error"}
    forwards: list[dict] = field(default_factory=list)
    agent: bool = False
    notes: list[str] = field(default_factory=list)
    # Set when the host could not be asked (state "unknown"): what stopped it, and the next step.
    host_error: HostUnavailable | None = field(default=None, repr=False)
    # project files the host runs, changed since `mariner trust` (tripwire.Change.to_json)
    tripwire: list[dict] = field(default_factory=list)
    backend: str | None = None     # the host backend that runs it: "microvm" | "runner"
    # How the guest's host key was pinned: "vsock" (unspoofable), "tcp" (vsock unavailable at
    # first contact), None (not pinned yet, or pinned before mariner recorded it)
    host_key_pinned_over: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "state": self.state, "project": self.project,
                "backend": self.backend,
                "managed": self.managed, "outdated": self.outdated,
                "changed_keys": self.changed_keys, "restart_pending": self.restart_pending,
                "address": self.address, "ssh_port": self.ssh_port, "cid": self.cid,
                "uptime": self.uptime, "forwards": self.forwards, "agent": self.agent,
                "notes": self.notes, "tripwire": self.tripwire,
                "host_key_pinned_over": self.host_key_pinned_over}


def _state_of(host: HostVmStatus, record: VmRecord | None, probe: bool = True) -> str:
    from .remote.target import GuestTarget, tcp_reachable

    if not host.exists:
        return "absent"
    if host.unit == "failed" or host.substate == "auto-restart":
        return "failed"
    if host.unit in ("inactive", "deactivating"):
        return "stopped"
    if host.unit == "activating":
        return "starting"
    if record is None or not probe:
        return "running"
    address, port = record.ssh_endpoint
    target = GuestTarget(name=record.name, host=address, port=port, user="",
                         identity=Path("/"), alias="", known_hosts=Path("/"),
                         vsock_cid=record.cid)
    # sshd in a slow (emulated) guest can take a second to send its banner
    return "running" if tcp_reachable(target, timeout=2.0) else "starting"


def why_unreachable(name: str) -> GuestUnreachable | None:
    """When a command could not reach VM `name`: its state in words and the next step, if the
    host says it is not running (None when it runs, or the host cannot be asked)."""
    try:
        backend = default_backend()
        backend.preflight()
        host = backend.status(name)
    except MarinerError:
        return None
    state = _state_of(host, None, probe=False)
    if state == "stopped":
        return GuestUnreachable(f"VM {name} is stopped", hint="`mariner up` starts it")
    if state == "failed":
        return GuestUnreachable(f"VM {name} failed (its hypervisor exited)",
                                hint="`mariner logs` shows why; `mariner up` starts it again")
    if state == "absent":
        return GuestUnreachable(f"VM {name} does not exist on this host",
                                hint="`mariner up` creates and starts it")
    return None


def _changed_keys(old: dict | None, new: dict) -> list[str]:
    if old is None:
        return []

    def flat(data, prefix="") -> dict:
        out = {}
        if isinstance(data, dict):
            for key, value in data.items():
                out.update(flat(value, f"{prefix}.{key}" if prefix else key))
        else:
            out[prefix] = data
        return out

    a, b = flat(old), flat(new)
    # which keys were defaulted is bookkeeping, not a setting of the VM
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "defaulted")


def status(cfg: ProjectConfig, *, backend: HostBackend | None = None) -> VmStatus:
    """The project's VM as the host and mariner see it, without changing anything."""
    from . import remote, tripwire
    from .drift import settle
    from .project import render_for

    backend = backend or default_backend()
    record = _owned_record(cfg, Registry())
    file_changes = [c.to_json() for c in tripwire.changes(str(cfg.project_dir)) or []]
    try:
        backend.preflight()
    except HostUnavailable as exc:
        known = dict(cid=record.cid, ssh_port=record.ssh_port,
                     address=record.ssh_endpoint[0]) if record else {}
        return VmStatus(name=cfg.name, state=UNKNOWN, managed=record is not None,
                        project=record.project if record else str(cfg.project_dir),
                        host_error=exc, tripwire=file_changes, backend=backend.name,
                        **known)
    host = backend.status(cfg.name)
    if record is None:
        state = "absent" if not host.exists else _state_of(host, None)
        return VmStatus(name=cfg.name, state=state, project=str(cfg.project_dir),
                        managed=False, tripwire=file_changes, notes=_approval_notes(cfg),
                        backend=backend.name)
    state = _state_of(host, record)
    result = VmStatus(name=cfg.name, state=state, project=record.project, managed=True,
                      backend=backend.name,
                      cid=record.cid, ssh_port=record.ssh_port,
                      address=record.ssh_endpoint[0],
                      uptime=host.uptime if host.running else None, tripwire=file_changes)
    settled = None
    if host.exists and record.built_hash:
        settled = settle(cfg, record.built_config)
        flake = render_for(cfg, record)
        result.outdated = flake.hash != record.built_hash
        if result.outdated:
            result.changed_keys = _changed_keys(record.built_config, flake.metadata["config"]) \
                or ["nix modules"]
    result.restart_pending = record.restart_pending or (host.running and host.restart_pending)
    result.agent = remote.agent_running(cfg.name) if host.running else False
    result.forwards, result.notes = _held_forwards(cfg, record, result.agent)
    if settled is not None:
        result.notes[:0] = settled.notes + (settled.warnings if result.outdated else [])
    result.notes += _approval_notes(cfg)
    from .remote.target import alias_for
    from .remote.trust import pin_channel

    result.host_key_pinned_over = pin_channel(paths.known_hosts_file(), alias_for(cfg.name))
    return result


def _approval_notes(cfg: ProjectConfig) -> list[str]:
    """A note when the host settings differ from the approval (`up` would refuse them)."""
    from .approval import review
    from .nixrender import read_host_inputs

    try:
        result = review(cfg, read_host_inputs(cfg))
    except OSError:
        return []
    if result.approved:
        return []
    return [f"{result.summary()}: `mariner up` refuses it until `mariner trust` approves it"]


def _held_forwards(cfg: ProjectConfig, record: VmRecord, agent: bool) -> tuple[list[dict], list[str]]:
    """The forwards as the VM's agent holds them (asked over its socket: no asyncssh here);
    the configured ones as `not held` when no agent answers. Plus notes on what differs."""
    from .remote import client
    from .remote.target import target_for

    def not_held(why: str) -> list[dict]:
        return [{"forward": str(p), "host": f"127.0.0.1:{p.host}",
                 "guest": f"127.0.0.1:{p.guest}", "state": "not held", "error": why,
                 "active": 0, "total": 0, "last_error": None} for p in cfg.ports]

    if not agent:
        return not_held("no agent is running (`mariner up` starts it)"), []
    try:
        info = client.agent_forwards(target_for(cfg, record))
    except (client.AgentUnavailable, MarinerError) as exc:
        return not_held(f"the agent did not answer: {getattr(exc, 'reason', exc)}"), []
    held = info.get("forwards") or []
    notes = []
    if info.get("stale"):
        notes.append(f"{info['stale']}: the next `mariner exec` or `mariner sync` replaces it")
    configured = [str(p) for p in cfg.ports]
    if [f.get("forward") for f in held] != configured:
        notes.append("[ports] forward changed since the agent started: `mariner up` applies it")
    return held, notes


def list_vms(*, backend: HostBackend | None = None) -> tuple[list[VmStatus], HostUnavailable | None]:
    """Every VM mariner knows on this host, plus the host's VMs it did not create. When the
    host cannot be asked: mariner's own VMs in state "unknown", and why."""
    from . import remote

    backend = backend or default_backend()
    records = Registry().load()
    try:
        backend.preflight()
    except HostUnavailable as exc:
        return [VmStatus(name=name, state=UNKNOWN, project=record.project, managed=True,
                         backend=backend.name, cid=record.cid, ssh_port=record.ssh_port,
                         address=record.ssh_endpoint[0])
                for name, record in sorted(records.items())], exc
    host_names = backend.list_vms()
    names = sorted(set(records) | set(host_names))
    statuses = backend.statuses(names)
    out = []
    for name in names:
        record = records.get(name)
        host = statuses[name]
        if record is None:
            out.append(VmStatus(name=name, state=_state_of(host, None, probe=False),
                                project=None, managed=False, backend=backend.name))
            continue
        out.append(VmStatus(name=name, state=_state_of(host, record), project=record.project,
                            managed=True, backend=backend.name, cid=record.cid,
                            ssh_port=record.ssh_port,
                            address=record.ssh_endpoint[0],
                            uptime=host.uptime if host.running else None,
                            agent=host.running and remote.agent_running(name),
                            restart_pending=record.restart_pending))
    return out, None

