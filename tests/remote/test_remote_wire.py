"""The agent's wire format and the exec fast path's import-free helpers: each agrees exactly
with the standard-library code it stands in for (json, re, pathlib)."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
from pathlib import Path, PurePosixPath

import pytest

from mariner_dev import paths
from mariner_dev.remote import client, command, proto

STRINGS = ["", "plain", 'quo"te', "back\\slash", "new\nline\r\t", "\x00\x01\x1f\x7f", "é ü ß",
           "日本語", "\U0001f600", "\udcff\ud800 lone surrogates", "</script>", "'", "a b"]


@pytest.mark.parametrize("value", [
    *STRINGS, None, True, False, 0, -1, 2 ** 70, 1.5, -0.0, 1e300, float("inf"), float("-inf"),
    [], {}, (1, "x"), [None, [True, {"k": "v"}]],
    {"proto": 2, "build": "0123abcd", "target": "f" * 16, "op": "exec",
     "request": {"command": "exec bash -l -c 'echo hi'", "tty": False, "stdin": True,
                 "term": None, "cols": 0, "rows": 0}, "forwards": "8000:80", "probe": True},
    {s: s for s in STRINGS},
])
def test_dumps_reads_back_as_json_dumps_does(value):
    assert json.loads(proto.dumps(value)) == json.loads(json.dumps(value))


def test_dumps_nan_and_random_strings():
    assert json.loads(proto.dumps(float("nan"))) != json.loads(proto.dumps(float("nan")))
    rng = random.Random(7)
    alphabet = [chr(i) for i in range(0x30)] + ['"', "\\", "é", "\u2028", "\udc80", "\U0010ffff"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert json.loads(proto.dumps({text: [text]})) == {text: [text]}


def test_dumps_refuses_what_json_cannot_carry():
    for bad in ({1: "int key"}, {"x": object()}, b"bytes"):
        with pytest.raises(TypeError):
            proto.dumps(bad)


def test_replies_are_marshal_for_this_protocol_and_json_for_protocol_1():
    body = {"status": 3, "message": None, "pair": (1, 2), "forwards": [{"host": "127.0.0.1:80"}]}
    expected = json.loads(json.dumps(body))          # tuples arrive as lists, as before
    assert proto.loads(proto.reply_payload(body, proto.PROTO)) == expected
    old = proto.reply_payload(body, 1)
    assert json.loads(old) == expected
    for answer in (old, b"{}", json.dumps({"kind": "stale"}).encode(), b"garbage"):
        with pytest.raises(ValueError):
            proto.loads(answer)


def test_frames():
    data = proto.frame(proto.EXIT, b"abc")
    assert proto.parse_header(data[:proto.HEADER_SIZE]) == (proto.EXIT, 3)
    assert data[proto.HEADER_SIZE:] == b"abc"
    assert proto.frame(proto.SIGNAL, b"INT") == b"S\x00\x00\x00\x03INT"
    with pytest.raises(ValueError):
        proto.parse_header(b"H" + (proto.MAX_FRAME + 1).to_bytes(4, "big"))


class _Target:
    name = "wire-test"

    @staticmethod
    def fingerprint() -> str:
        return "0" * 16


def test_an_agent_of_protocol_1_is_stale_to_this_client(tmp_path):
    """An agent of the previous release reads our HELLO (it must still be JSON), answers
    "stale" in JSON and steps down; this client must see stale, not hang or fail."""
    path = client.socket_file(_Target.name)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    seen = {}

    def old_agent():   # what proto 1's agent did with a HELLO of another protocol
        conn, _ = listener.accept()
        with conn:
            kind, length = proto.parse_header(conn.recv(proto.HEADER_SIZE, socket.MSG_WAITALL))
            seen["hello"] = json.loads(conn.recv(length, socket.MSG_WAITALL))
            conn.sendall(proto.frame(proto.ERROR, json.dumps(
                {"kind": "stale", "message": "the running agent is from another build"}).encode()))

    thread = threading.Thread(target=old_agent)
    thread.start()
    try:
        with pytest.raises(client.AgentUnavailable) as info:
            client.ping(_Target())
        thread.join(5)
    finally:
        listener.close()
        os.unlink(path)
    assert info.value.stale
    assert seen["hello"]["proto"] == proto.PROTO and seen["hello"]["op"] == "ping"


@pytest.mark.parametrize("xdg", ["{d}", "{d}/", "{d}//", "{d}/./", "/{d}", "{d}/../{b}"])
def test_runtime_dir_str_is_runtime_dir(xdg, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg.format(d=tmp_path, b=tmp_path.name))
    assert paths.runtime_dir_str() == str(paths.runtime_dir())
    assert client.socket_file("x" * 120) == str(client.socket_path("x" * 120))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert paths.runtime_dir_str() == str(paths.runtime_dir()) == f"/tmp/mariner-{os.getuid()}"


@pytest.mark.parametrize("path", ["", ".", "/", "//", "///", "a", "a/", "./a/./b//c/", "//a/b",
                                  "///a", "a/../b", "/./", "../x", ". /a"])
def test_normalized_is_pathlib(path):
    assert paths._normalized(path) == str(PurePosixPath(path))


@pytest.mark.parametrize("xdg", [None, "", "/etc/xdg/", "~/conf", "rel//dir"])
def test_user_config_file_str_is_user_config_file(xdg, monkeypatch):
    if xdg is None:
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg)
    assert paths.user_config_file_str() == str(paths.user_config_file())


def test_quoting_and_env_names_match_the_regular_expressions():
    safe = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
    env_name = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    rng = random.Random(11)
    alphabet = "aZ09_@%+=:,./-$ '\"\n\té\x00ß٣"
    for _ in range(20000):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        expected = word if word and safe.fullmatch(word) else \
            "'" + word.replace("'", "'\"'\"'") + "'"
        assert command.quote(word) == expected
        assert command.check_env_name(word) == bool(env_name.fullmatch(word))
