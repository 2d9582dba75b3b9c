"""Where each key and value sits in a TOML file (line and column), for error messages.

tomllib and tomlkit give values but not their positions, so this small scanner walks the
text of a file that already parsed and records, for every key path, the 1-based line and
column of the key and of its value. Array elements get paths ending in their index.
"""

from __future__ import annotations

import re

Path_ = tuple  # a key path: ("vm", "cpus"), ("shares", 0, "target"), ("ports", "forward", 1)

_BARE = re.compile(r"[A-Za-z0-9_-]+")


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.keys: dict[Path_, tuple[int, int]] = {}
        self.values: dict[Path_, tuple[int, int]] = {}
        self.tables: dict[Path_, tuple[int, int]] = {}
        self._line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self._line_starts.append(i + 1)

    def where(self, pos: int) -> tuple[int, int]:
        import bisect

        line = bisect.bisect_right(self._line_starts, pos) - 1
        return line + 1, pos - self._line_starts[line] + 1

    # -- low-level helpers -------------------------------------------------------------
    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def skip_ws(self, newlines: bool = False) -> None:
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in " \t\r" or (newlines and ch == "\n"):
                self.pos += 1
            elif ch == "#" and newlines:
                while self.pos < len(self.text) and self.text[self.pos] != "\n":
                    self.pos += 1
            else:
                break

    def skip_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end + 1

    def read_key_part(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.read_basic_string()
        if ch == "'":
            end = self.text.find("'", self.pos + 1)
            part = self.text[self.pos + 1:end]
            self.pos = end + 1
            return part
        m = _BARE.match(self.text, self.pos)
        if not m:
            raise ValueError("bad key")
        self.pos = m.end()
        return m.group(0)

    def read_dotted_key(self) -> list[str]:
        parts = [self.read_key_part()]
        while True:
            self.skip_ws()
            if self.peek() == ".":
                self.pos += 1
                self.skip_ws()
                parts.append(self.read_key_part())
            else:
                return parts

    def read_basic_string(self) -> str:
        import json

        start = self.pos
        self.pos += 1
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\":
                self.pos += 2
                continue
            self.pos += 1
            if ch == '"':
                break
        raw = self.text[start:self.pos]
        try:
            return json.loads(raw)
        except ValueError:
            return raw[1:-1]

    def skip_string(self) -> None:
        for quote in ('"""', "'''"):
            if self.text.startswith(quote, self.pos):
                end = self.pos + 3
                while True:
                    end = self.text.find(quote, end)
                    if end < 0:
                        self.pos = len(self.text)
                        return
                    if quote == '"""' and self._escaped(end):
                        end += 1
                        continue
                    break
                self.pos = end + 3
                while self.peek() == quote[0]:  # up to two quotes may end the content
                    self.pos += 1
                return
        if self.peek() == '"':
            self.read_basic_string()
        else:
            end = self.text.find("'", self.pos + 1)
            self.pos = len(self.text) if end < 0 else end + 1

    def _escaped(self, idx: int) -> bool:
        n = 0
        while idx - 1 - n >= 0 and self.text[idx - 1 - n] == "\\":
            n += 1
        return n % 2 == 1

    # -- values --------------------------------------------------------------------------
    def value(self, path: Path_) -> None:
        self.values[path] = self.where(self.pos)
        ch = self.peek()
        if ch in "\"'":
            self.skip_string()
        elif ch == "[":
            self.pos += 1
            index = 0
            while True:
                self.skip_ws(newlines=True)
                if self.peek() in ("]", ""):
                    self.pos += 1
                    return
                self.value(path + (index,))
                index += 1
                self.skip_ws(newlines=True)
                if self.peek() == ",":
                    self.pos += 1
        elif ch == "{":
            self.pos += 1
            while True:
                self.skip_ws()
                if self.peek() in ("}", ""):
                    self.pos += 1
                    return
                key_pos = self.pos
                parts = self.read_dotted_key()
                sub = path + tuple(parts)
                self.keys[sub] = self.where(key_pos)
                self.skip_ws()
                self.pos += 1  # '='
                self.skip_ws()
                self.value(sub)
                self.skip_ws()
                if self.peek() == ",":
                    self.pos += 1
        else:
            m = re.compile(r"[^,\]\}\s#]+").match(self.text, self.pos)
            self.pos = m.end() if m else self.pos + 1

    # -- document ---------------------------------------------------------------------------
    def document(self) -> None:
        table: Path_ = ()
        array_counts: dict[Path_, int] = {}
        while self.pos < len(self.text):
            self.skip_ws(newlines=True)
            if self.pos >= len(self.text):
                break
            start = self.pos
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                self.skip_ws()
                name = tuple(self.read_dotted_key())
                index = array_counts.get(name, 0)
                array_counts[name] = index + 1
                table = name + (index,)
                self.tables[table] = self.where(start)
                self.tables.setdefault(name, self.where(start))
                self.keys.setdefault(name, self.where(start))
                self.skip_line()
            elif self.peek() == "[":
                self.pos += 1
                self.skip_ws()
                table = tuple(self.read_dotted_key())
                self.tables[table] = self.where(start)
                self.keys.setdefault(table, self.where(start))
                self.skip_line()
            else:
                try:
                    parts = self.read_dotted_key()
                except ValueError:
                    self.skip_line()
                    continue
                path = table + tuple(parts)
                self.keys[path] = self.where(start)
                self.skip_ws()
                if self.peek() == "=":
                    self.pos += 1
                self.skip_ws()
                self.value(path)


class Positions:
    """Line/column look-ups for key paths of one TOML text."""

    def __init__(self, text: str):
        scanner = _Scanner(text)
        try:
            scanner.document()
        except (ValueError, IndexError):
            pass  # positions are best effort; the file itself already parsed
        self.keys = scanner.keys
        self.values = scanner.values
        self.tables = scanner.tables

    def of_value(self, path: Path_) -> tuple[int | None, int | None]:
        """Position of the value at `path`, else of its nearest located parent."""
        p = tuple(path)
        while p:
            if p in self.values:
                return self.values[p]
            if p in self.tables:
                return self.tables[p]
            if p in self.keys:
                return self.keys[p]
            p = p[:-1]
        return None, None

    def of_key(self, path: Path_) -> tuple[int | None, int | None]:
        """Position of the key at `path` (for unknown keys), else of its value or parent."""
        p = tuple(path)
        if p in self.keys:
            return self.keys[p]
        return self.of_value(p)
