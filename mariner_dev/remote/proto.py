"""The agent's wire protocol over its Unix socket, and the build hash both sides compare.

A frame is one type byte, a 4-byte big-endian length and the payload. The client's first frame
(HELLO, JSON) names the operation. For `exec` it carries the client's stdin/stdout/stderr as
SCM_RIGHTS, so the agent reads and writes the client's own file descriptors: output never takes
an extra hop through the client.

Operations: `ping` (READY), `exec` (READY, then EXIT), `forwards` (READY with the forwards the
agent holds and their state), `sync` (READY when accepted, then RESULT with the report, or
ERROR). A HELLO whose build or target differs from the agent's gets ERROR "stale" and the agent
steps down, unless the HELLO is a `probe` (read-only queries such as `status`): then the agent
only answers. A HELLO may carry `forwards` (the fingerprint of the `[ports] forward` list the
caller expects, as `up` sends it); a different one is stale too.
"""

from __future__ import annotations

import os
import struct
from functools import lru_cache
from pathlib import Path

PROTO = 1

HELLO = b"H"     # client -> agent: {"proto", "build", "target", "op", "request",
                 #                   "forwards"?, "probe"?}
READY = b"R"     # agent -> client: {"pid", "build", "connected", "forwards"?}
ERROR = b"E"     # agent -> client: {"kind": "stale"|"unreachable"|"failed"|"bad", "message",
                 #                   "hint"?, "exit_code"?}
EXIT = b"X"      # agent -> client: {"status", "message"}
RESULT = b"T"    # agent -> client: an operation's JSON result (`sync`)
SIGNAL = b"S"    # client -> agent: signal name, e.g. b"INT"
RESIZE = b"W"    # client -> agent: {"cols", "rows"}

_HEADER = struct.Struct(">cI")
HEADER_SIZE = _HEADER.size
MAX_FRAME = 64 << 20     # a sync report of many thousands of changes stays well below
PORT_RETRY = 5.0         # seconds between the agent's tries of a forward whose port was taken


def forwards_fingerprint(forwards) -> str:
    """The `[ports] forward` list as the agent and `up` compare it: `HOST:GUEST,...` in order."""
    return ",".join(f"{int(host)}:{int(guest)}" for host, guest in forwards)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def parse_header(data: bytes) -> tuple[bytes, int]:
    kind, length = _HEADER.unpack(data)
    if length > MAX_FRAME:
        raise ValueError(f"frame too large ({length} bytes)")
    return kind, length


@lru_cache(maxsize=1)
def build_hash() -> str:
    """A checksum of the code the agent and its clients run: a change means a new agent.

    Covers this package, the sync engine and the forwards, since the agent serves those too.
    Not a security boundary (the socket is 0600 in a 0700 directory), so zlib's CRC and
    Adler checksums do, and the exec fast path avoids importing hashlib.
    """
    import zlib

    from .. import __version__

    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.dirname(here)
    files = [os.path.join(here, n) for n in sorted(os.listdir(here)) if n.endswith(".py")]
    sync_dir = os.path.join(package, "sync")
    try:
        files += [os.path.join(sync_dir, n) for n in sorted(os.listdir(sync_dir))
                  if n.endswith(".py")]
    except OSError:
        pass
    files.append(os.path.join(package, "forward.py"))
    crc, adler = 0, 1
    for path in files:
        try:
            with open(path, "rb") as fh:
                data = os.path.relpath(path, package).encode() + fh.read()
        except OSError:
            continue
        crc, adler = zlib.crc32(data, crc), zlib.adler32(data, adler)
    tail = __version__.encode()
    return f"{zlib.crc32(tail, crc):08x}{zlib.adler32(tail, adler):08x}"


def socket_name(name: str, runtime: Path) -> Path:
    """The agent socket of VM `name`, kept under the 108-byte limit of Unix socket paths."""
    path = runtime / f"{name}.sock"
    if len(os.fsencode(str(path))) < 100:
        return path
    import hashlib

    return runtime / (hashlib.sha256(name.encode()).hexdigest()[:16] + ".sock")
