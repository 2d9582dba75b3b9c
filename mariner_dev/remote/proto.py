"""The agent's wire protocol over its Unix socket, and the build hash both sides compare.

A frame is one type byte, a 4-byte big-endian length and the payload. The client's first frame
(HELLO) names the operation. For `exec` it carries the client's stdin/stdout/stderr as
SCM_RIGHTS, so the agent reads and writes the client's own file descriptors: output never takes
an extra hop through the client.

Payloads (PROTO 2): what the client sends (HELLO, RESIZE) is JSON, written by `dumps` below
without importing the json module; SIGNAL is a signal name in ASCII. What the agent answers
(READY, ERROR, EXIT, RESULT) is `marshal` data (`reply_payload`, `loads`), which the client
reads with a module the interpreter has already loaded: the exec client imports neither json
nor `re`. The HELLO stays JSON whatever PROTO says, because it is how versions meet: an agent
of any build parses it, sees another `proto` or `build`, and answers "stale" (in JSON to a
client of PROTO 1, which reads nothing else). A client that gets a JSON answer (an agent of
PROTO 1) treats it as stale. The socket is private to the user (0600 in a 0700 directory), so
the client trusts its agent's marshal data; the agent only ever parses JSON from clients.

Operations: `ping` (READY), `exec` (READY, then EXIT), `forwards` (READY with the forwards the
agent holds and their state), `sync` (READY when accepted, ALIVE every ALIVE_INTERVAL seconds while it
works, then RESULT with the report, or ERROR; a client hears nothing for SILENCE_LIMIT seconds
only from an agent that froze). A HELLO whose build or target differs from the agent's gets ERROR "stale" and the agent
steps down, unless the HELLO is a `probe` (read-only queries such as `status`): then the agent
only answers. A HELLO may carry `forwards` (the fingerprint of the `[ports] forward` list the
caller expects, as `up` sends it); a different one is stale too. A `ping` from `up` says
`retry_ports`: the agent tries the host ports it could not take once more, and again every
PORT_RETRY seconds for PORT_RETRY_WINDOW seconds (as after its own start); after that a port
that was taken stays unforwarded until the next `up`: the agent never binds a port later,
behind the user's back.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # the exec fast path does not import pathlib
    from pathlib import Path

PROTO = 2

HELLO = b"H"     # client -> agent: {"proto", "build", "target", "op", "request",
                 #                   "forwards"?, "probe"?, "retry_ports"?}
READY = b"R"     # agent -> client: {"pid", "build", "connected", "forwards"?}
ERROR = b"E"     # agent -> client: {"kind": "stale"|"unreachable"|"failed"|"bad", "message",
                 #                   "hint"?, "exit_code"?}
EXIT = b"X"      # agent -> client: {"status", "message"}
RESULT = b"T"    # agent -> client: an operation's JSON result (`sync`)
ALIVE = b"A"     # agent -> client: empty; still at work on the client's sync
SIGNAL = b"S"    # client -> agent: signal name, e.g. b"INT"
RESIZE = b"W"    # client -> agent: {"cols", "rows"}

HEADER_SIZE = 5
MAX_FRAME = 64 << 20     # a sync report of many thousands of changes stays well below
ALIVE_INTERVAL = 5.0     # a sync's client hears from the agent at least this often
SILENCE_LIMIT = 30.0     # ... and gives up on an agent silent for this long (frozen)
PORT_RETRY = 5.0         # seconds between the agent's tries of a forward whose port was taken
PORT_RETRY_WINDOW = 30.0  # ... for this long after it started or `up` asked; then never again


def forwards_fingerprint(forwards) -> str:
    """The `[ports] forward` list as the agent and `up` compare it: `HOST:GUEST,...` in order."""
    return ",".join(f"{int(host)}:{int(guest)}" for host, guest in forwards)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + len(payload).to_bytes(4, "big") + payload


def parse_header(data: bytes) -> tuple[bytes, int]:
    if len(data) != HEADER_SIZE:
        raise ValueError(f"a frame header is {HEADER_SIZE} bytes, not {len(data)}")
    kind, length = data[:1], int.from_bytes(data[1:], "big")
    if length > MAX_FRAME:
        raise ValueError(f"frame too large ({length} bytes)")
    return kind, length


_JSON_ESCAPES = {i: f"\\u{i:04x}" for i in range(0x20)}
_JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n",
                      ord("\r"): "\\r", ord("\t"): "\\t"})


def _json(obj, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append('"' + obj.translate(_JSON_ESCAPES) + '"')
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        if obj != obj:
            out.append("NaN")
        elif obj in (float("inf"), float("-inf")):
            out.append("Infinity" if obj > 0 else "-Infinity")
        else:
            out.append(float.__repr__(obj))
    elif isinstance(obj, dict):
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            if i:
                out.append(",")
            _json(key, out)
            out.append(":")
            _json(value, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _json(value, out)
        out.append("]")
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj) -> bytes:
    """`obj` (dicts with str keys, lists, tuples, str, int, float, bool, None) as JSON bytes.

    What `json.dumps(obj).encode()` gives, as far as `json.loads` can tell, without importing
    json: non-ASCII text is UTF-8 (lone surrogates included, which json.loads reads back with
    `surrogatepass`) rather than \\u escapes."""
    out: list[str] = []
    _json(obj, out)
    return "".join(out).encode("utf-8", "surrogatepass")


def loads(payload: bytes):
    """An agent's answer (READY, ERROR, EXIT, RESULT). ValueError if it is not PROTO 2 data,
    such as the JSON object an agent of PROTO 1 answers with (`{"` or `{}`: marshal writes a
    dict as `{` and a type code, and neither `"` nor `}` is one)."""
    import marshal  # builtin, and loaded by the interpreter at start-up: free

    if payload[:2] in (b'{"', b"{}"):
        raise ValueError("a JSON answer: the agent speaks protocol 1")
    try:
        return marshal.loads(payload)
    except (EOFError, TypeError) as exc:
        raise ValueError(f"not an agent answer ({exc})") from None


def reply_payload(body, client_proto) -> bytes:
    """The agent's encoding of an answer to a client that said `proto: client_proto`.

    Exactly the values a JSON round trip gives (tuples become lists, and so on), so that what
    a client reads does not depend on the encoding; JSON itself for a client of PROTO 1."""
    import json
    import marshal

    text = json.dumps(body)
    if client_proto != PROTO:
        return text.encode()
    return marshal.dumps(json.loads(text))


_BUILD_HASH: str | None = None


def build_hash() -> str:
    global _BUILD_HASH
    if _BUILD_HASH is None:
        _BUILD_HASH = _compute_build_hash()
    return _BUILD_HASH


def _compute_build_hash() -> str:
    """A checksum of the code the agent and its clients run: a change means a new agent.

    Covers this package, the sync engine (with the secret shapes it refuses files by) and the
    forwards, since the agent serves those too.
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
    files += [os.path.join(package, "forward.py"), os.path.join(package, "secret_shapes.py")]
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


def socket_file(name: str, runtime: str) -> str:
    """The agent socket of VM `name` in the directory `runtime` (a normalized path, as
    paths.runtime_dir_str() gives), kept under the 108-byte limit of Unix socket paths."""
    path = os.path.join(runtime, f"{name}.sock")
    if len(os.fsencode(path)) < 100:
        return path
    import hashlib

    return os.path.join(runtime, hashlib.sha256(name.encode()).hexdigest()[:16] + ".sock")


def socket_name(name: str, runtime: "Path") -> "Path":
    """socket_file() as a Path."""
    from pathlib import Path

    return Path(socket_file(name, str(runtime)))
