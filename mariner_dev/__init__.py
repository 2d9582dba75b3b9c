"""mariner: a disposable NixOS microVM per project, driven like `docker exec`."""

__version__ = "0.1.0"
