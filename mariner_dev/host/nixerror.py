"""Turn a failed Nix build's stderr into a few lines a developer can act on.

Nix prints a trace of dozens of lines for one mistake; what matters is the `error:` line, and
when mariner recognises the cause, the mariner.toml key that produced it (an unknown package
name comes from `nix.packages`, not from the rendered vm.nix the trace points at).
"""

from __future__ import annotations

import re

from ..errors import HostError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR_LINE = re.compile(r"^\s*error:\s?(.*)$")
_OPTION = r"[`'‘]([A-Za-z0-9_.<>*\"-]+)['’]"

# Which mariner.toml key renders which NixOS option (first matching prefix wins).
_OPTION_KEYS: tuple[tuple[str, str], ...] = (
    ("environment.systemPackages", "nix.packages"),
    ("environment.variables", "env"),
    ("networking.hostName", "vm.name"),
    ("microvm.vcpu", "vm.cpus"),
    ("microvm.mem", "vm.memory"),
    ("microvm.hypervisor", "vm.hypervisor"),
    ("microvm.vsock.cid", "vm.cid"),
    ("mariner.cid", "vm.cid"),
    ("mariner.username", "vm.user"),
    ("users.groups", "vm.gid"),
    ("microvm.shares", "shares"),
    ("microvm.volumes", "storage"),
    ("mariner.storage", "storage"),
    ("microvm.interfaces", "network"),
    ("microvm.forwardPorts", "network"),
    ("mariner.network", "network"),
    ("mariner.docker", "docker.enable"),
    ("mariner.ssh.authorizedKey", "ssh.identity"),
)


class NixBuildError(HostError):
    """`microvm -c`/`-u` failed because Nix could not evaluate or build the VM."""

    def __init__(self, message: str, *, nix_message: str, config_key: str | None,
                 argv: list[str] | None = None, stderr_tail: str = "",
                 returncode: int | None = None, hint: str | None = None):
        super().__init__(message, argv=argv, stderr_tail=stderr_tail, returncode=returncode,
                         hint=hint)
        self.nix_message = nix_message
        self.config_key = config_key


def option_config_key(option: str) -> str | None:
    """The mariner.toml key that renders the NixOS option `option`, or None."""
    option = option.strip('"')
    if option.startswith("users.users."):
        return "vm.gid" if option.endswith((".group", ".gid")) else "vm.uid" if option.endswith(".uid") else "vm.user"
    for prefix, key in _OPTION_KEYS:
        if option == prefix or option.startswith(prefix + "."):
            return key
    return None


# Where a definition or an error sits: mariner's vm.nix, or a project module that the renderer
# copied into the flake's modules/ directory as "<index>-<name>" (in the store as
# <hash>-source/modules/..., or in the flake dir). nix-mariner's own modules/*.nix have no
# index prefix.
_PROJECT_MODULE = re.compile(r"(?:-source|/flake)/modules/(\d+-[^:/\s'`]+)")
_VM_NIX = re.compile(r"(?:-source|/flake)/vm\.nix\b")


def _origin(text: str) -> str | None:
    """"modules" or "vm.nix" when the text points into one of them, else None."""
    module = _PROJECT_MODULE.search(text)
    vm = _VM_NIX.search(text)
    if module and (not vm or module.start() < vm.start()):
        return "modules"
    return "vm.nix" if vm else None


def _module_name(text: str) -> str | None:
    match = _PROJECT_MODULE.search(text)
    return match.group(1) if match else None


def _clean(text: str) -> list[str]:
    return [_ANSI.sub("", line).rstrip() for line in text.splitlines()]


def _error_messages(lines: list[str]) -> list[tuple[int, str]]:
    found = []
    for index, line in enumerate(lines):
        match = _ERROR_LINE.match(line)
        if match:
            found.append((index, match.group(1).strip()))
    return found


def _block_after(lines: list[str], index: int, limit: int = 12) -> list[str]:
    """The indented lines that continue an `error:` line, up to the trace or source excerpt."""
    block = []
    for line in lines[index + 1:index + 1 + limit]:
        stripped = line.strip()
        if not stripped:
            if block:
                break
            continue
        if stripped.startswith(("at ", "…", "...", "error:")) or re.match(r"^\d+\|", stripped):
            break
        block.append(stripped)
    return block


def explain_build_error(stderr: str) -> tuple[str, str | None]:
    """(a short message, the mariner.toml key it points at or None) for a failed Nix build."""
    lines = _clean(stderr)
    text = "\n".join(lines)
    errors = _error_messages(lines)

    match = re.search(r"cannot find attribute [`'‘]([^'’`]+)['’]", text)
    if match:
        return f"nixpkgs has no package `{match.group(1)}`", "nix.packages"

    missing = re.search(r"attribute [`'‘]([^'’`]+)['’] missing", text) \
        or re.search(r"undefined variable [`'‘]([^'’`]+)['’]", text)
    if missing:
        name = missing.group(1)
        what = "attribute" if "missing" in missing.group(0) else "variable"
        after = text[missing.end():]
        if _origin(after) == "modules":
            return f"undefined {what} `{name}` in module {_module_name(after)}", "nix.modules"
        if "environment.systemPackages" in text:
            return f"nixpkgs has no package `{name}`", "nix.packages"
        options = re.findall(r"option " + _OPTION, text)
        key = option_config_key(options[-1]) if options else None
        return f"undefined {what} `{name}`", key

    match = re.search(r"The option " + _OPTION + r" (?:does not exist|can no longer be used)",
                      text)
    if match:
        option = match.group(1)
        origin = _origin(text[match.end():])
        if origin == "modules":
            return (f"the option `{option}` does not exist (set in module "
                    f"{_module_name(text[match.end():])})"), "nix.modules"
        if origin == "vm.nix" or option_config_key(option) is not None:
            return (f"the option `{option}` does not exist in the nix-mariner/microvm.nix "
                    f"revision the flake uses"), "nix.mariner"
        return f"the option `{option}` does not exist", "nix.modules"

    match = re.search(r"(?:The option|definition for option) " + _OPTION
                      + r"(?: is used but not defined| has conflicting definition values"
                      r"| is not of type[^\n]*)", text)
    if match:
        option = match.group(1)
        first = next((m for _, m in errors if option in m), match.group(0))
        first = re.sub(r"\.?\s*Definition values:.*$", "", first).rstrip(":. ")
        if _origin(text[match.end():]) == "modules":
            return first, "nix.modules"
        return first, option_config_key(option) or "nix.modules"

    if "Failed assertions:" in text:
        index = next(i for i, line in enumerate(lines) if "Failed assertions:" in line)
        failed = [line.strip()[2:] for line in lines[index + 1:] if line.strip().startswith("- ")]
        options = re.findall(r"(?:microvm|mariner)\.[A-Za-z0-9_.]+|forwardPorts|interfaces|shares",
                             " ".join(failed))
        key = None
        for option in options:
            key = option_config_key(option if "." in option else f"microvm.{option}")
            if key:
                break
        return "failed assertions: " + "; ".join(failed or ["(none listed)"]), key

    match = re.search(r"hash mismatch in fixed-output derivation [`'‘]?([^'’`:\s]+)", text)
    if match:
        got = re.search(r"got:\s*(\S+)", text)
        return (f"hash mismatch in fixed-output derivation {match.group(1)}"
                + (f" (got {got.group(1)})" if got else "")
                + ": a pinned download changed upstream or was corrupted"), None

    for pattern in (r"unable to download[^\n]*", r"[Cc]ould(?: not|n't) resolve host[^\n]*",
                    r"Failed to connect[^\n]*", r"Connection timed out[^\n]*",
                    r"SSL connect error[^\n]*", r"unable to access[^\n]*"):
        match = re.search(pattern, text)
        if match:
            return (f"Nix could not download what the VM needs ({match.group(0).strip()}); "
                    f"check the host's network, proxy and substituters"), None

    match = re.search(r"builder for [`'‘]([^'’`]+)['’] failed[^\n]*", text)
    if match:
        log_lines = [line.strip()[2:] for line in lines if line.strip().startswith("> ")]
        message = match.group(0).rstrip(";")
        if log_lines:
            message += "; last log lines:\n" + "\n".join(log_lines[-10:])
        return message, None

    meaningful = [(i, m) for i, m in errors if m]
    if meaningful:
        index, message = meaningful[-1]
        extra = _block_after(lines, index)
        return " ".join([message, *extra]).strip(), None
    if errors:  # a bare "error:" with the message on the indented lines after it
        extra = _block_after(lines, errors[-1][0])
        if extra:
            return " ".join(extra), None
    tail = [line.strip() for line in lines if line.strip()]
    return (tail[-1] if tail else "the build failed without a message"), None


def build_failure(name: str, result) -> NixBuildError:
    """The error for a failed build of VM `name` (a host command's result), naming the
    mariner.toml key the Nix message points at; one place for every backend."""
    from . import commands

    output = result.stderr if result.stderr.strip() else result.stdout
    message, key = explain_build_error(output)
    return NixBuildError(f"building VM {name} failed: {message}", nix_message=message,
                         config_key=key, argv=result.argv,
                         stderr_tail=commands.tail_lines(output),
                         returncode=result.returncode,
                         hint=f"check `{key}` in mariner.toml" if key else None)
