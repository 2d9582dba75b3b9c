"""Host files and guest trees, async cores on a thread of their own, a loopback echo server."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import socketserver
import stat
import threading
from pathlib import Path


class LoopThread:
    """An asyncio loop on a thread; `run(coro)` schedules, `call(coro)` waits for a result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Lines:
    """Collects output lines from any thread."""

    def __init__(self):
        self.items: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            self.items.append(line)

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.items)

    def having(self, text: str) -> list[str]:
        return [line for line in self.snapshot() if text in line]


class EchoServer:
    """A TCP echo server on 127.0.0.1 playing a service inside the VM; records EOFs."""

    def __init__(self):
        self.eofs = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                while True:
                    data = self.request.recv(65536)
                    if not data:
                        outer.eofs += 1
                        self.request.shutdown(socket.SHUT_WR)
                        return
                    self.request.sendall(data)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo_roundtrip(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    """Send `payload` to 127.0.0.1:port, half-close, read everything back until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        sender.join()
    return b"".join(chunks)


class LineReader:
    """Reads a subprocess pipe on a thread, so that a test waits for a line on a deadline."""

    def __init__(self, pipe):
        import queue

        self.queue: "queue.Queue[str]" = queue.Queue()

        def pump():
            for raw in iter(pipe.readline, b""):
                self.queue.put(raw.decode(errors="replace"))

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 15.0) -> str:
        import queue

        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout} s") from None


def write(path: Path, text: str | bytes, mode: int = 0o644, mtime: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def give_to_guest(root: Path) -> None:
    """Files the test made in the guest's tree as root belong to the guest account, as if the
    guest had made them."""
    owner = root.stat()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(Path(dirpath) / name, owner.st_uid, owner.st_gid)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: (kind, content or link target, mode, mtime, inode)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), None, None, st.st_ino)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, stat.S_IMODE(st.st_mode), int(st.st_mtime), st.st_ino)
            else:
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode), int(st.st_mtime),
                            st.st_ino)
    return out


def fresh_root(g) -> Path:
    """A new directory in the guest account's home, owned by it, standing for `~`."""
    root = g.home / f"mt-{secrets.token_hex(6)}"
    root.mkdir()
    os.chown(root, g.uid, os.stat(g.home).st_gid)
    return root
