"""The SSH identity mariner logs in with: the user's `[ssh] identity`, or one it generates."""

from __future__ import annotations

import os
from pathlib import Path

from . import paths
from .errors import MarinerError
from .fsutil import file_lock, write_atomic
from .model import ProjectConfig

KEY_NAME = "id_ed25519"


def default_identity(create: bool = True) -> Path:
    """mariner's own ed25519 key in MARINER_HOME/keys (private 0600, directory 0700)."""
    key = paths.keys_dir() / KEY_NAME
    if key.is_file() or not create:
        return key
    paths.ensure_private_dir(paths.mariner_home())
    paths.ensure_private_dir(paths.keys_dir())
    with file_lock(paths.keys_dir() / ".lock", what="mariner's key directory"):
        if not key.is_file():
            _generate(key)
    return key


def _generate(key: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
    comment = f"mariner@{os.uname().nodename}"
    # The public half first: a crash between the two writes leaves no private key without it.
    write_atomic(key.with_name(key.name + ".pub"), public.decode() + f" {comment}\n", mode=0o644)
    write_atomic(key, pem, mode=0o600)


def identity_for(cfg: ProjectConfig, create: bool = True) -> Path:
    """The private key file used to reach this project's VM."""
    return cfg.ssh.identity if cfg.ssh.identity is not None else default_identity(create)


def public_key_for(cfg: ProjectConfig, create: bool = True) -> str:
    """The one-line public key that the rendered flake authorizes."""
    identity = identity_for(cfg, create)
    pub = identity.with_name(identity.name + ".pub")
    try:
        text = pub.read_text().strip()
    except OSError as exc:
        raise MarinerError(f"cannot read the public key {pub}: {exc.strerror}; "
                           f"set [ssh] identity to a key with a .pub beside it") from None
    line = text.splitlines()[0] if text else ""
    if not line.startswith(("ssh-", "ecdsa-", "sk-")):
        raise MarinerError(f"{pub} does not hold an OpenSSH public key")
    return line
