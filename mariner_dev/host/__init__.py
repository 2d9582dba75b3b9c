"""The host layer: everything that touches the VM machinery of the host.

`backend.HostBackend` is the interface, `microvm.MicrovmHost` its implementation for a NixOS
host with the microvm.nix host module, and `commands` the one wrapper every host command goes
through.
"""
