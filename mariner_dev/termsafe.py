"""Text for the user's terminal that mariner did not write itself, made inert.

Guest output inside error messages, file names from the guest or a repository, config values
and SFTP error strings can carry escape sequences (retitle the window, rewrite the screen,
hide a line, OSC 52 clipboard writes). Every message mariner prints at the CLI edge goes
through `printable()`: control characters become visible escapes (`\\x1b`, `\\r`...), and so
do C1 controls, DEL and the Unicode bidi and line-separator marks. Line breaks stay when the
caller says so (mariner's own multi-line messages). exec and shell output never come here.

Imports nothing: the exec fast path uses it.
"""

from __future__ import annotations

_NAMED = {"\t": "\\t", "\r": "\\r", "\n": "\\n", "\x1b": "\\x1b"}
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C,
                                                                     0x2028, 0x2029}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_TABLE = {c: _escape(chr(c)) for c in [*range(0x20), *range(0x7F, 0xA0), *_BIDI]}
_TABLE_LINES = dict(_TABLE)
del _TABLE_LINES[ord("\n")]


def printable(text, keep_newlines: bool = False) -> str:
    """`text` with every control character escaped (`\\n` kept when keep_newlines)."""
    text = str(text)
    if text.isprintable():
        return text
    return text.translate(_TABLE_LINES if keep_newlines else _TABLE)
