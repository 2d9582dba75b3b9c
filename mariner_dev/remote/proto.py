"""The agent's wire protocol over its Unix socket, and the build hash both sides compare.

A frame is one type byte, a 4-byte big-endian length and the payload. The client's first frame
(HELLO, JSON) carries its stdin/stdout/stderr as SCM_RIGHTS, so the agent reads and writes the
client's own file descriptors: output never takes an extra hop through the client.
"""

from __future__ import annotations

import os
import struct
from functools import lru_cache
from pathlib import Path

PROTO = 1

HELLO = b"H"     # client -> agent: {"proto", "build", "target", "op", "request"}
READY = b"R"     # agent -> client: {"pid", "build"}
ERROR = b"E"     # agent -> client: {"kind": "stale"|"unreachable"|"bad", "message"}
EXIT = b"X"      # agent -> client: {"status", "message"}
SIGNAL = b"S"    # client -> agent: signal name, e.g. b"INT"
RESIZE = b"W"    # client -> agent: {"cols", "rows"}

_HEADER = struct.Struct(">cI")
HEADER_SIZE = _HEADER.size
MAX_FRAME = 1 << 20


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

    Not a security boundary (the socket is 0600 in a 0700 directory), so zlib's CRC and
    Adler checksums do, and the exec fast path avoids importing hashlib.
    """
    import zlib

    from .. import __version__

    here = os.path.dirname(os.path.abspath(__file__))
    crc, adler = 0, 1
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as fh:
                data = name.encode() + fh.read()
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
