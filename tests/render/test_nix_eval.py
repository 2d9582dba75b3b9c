"""Rendered flakes are parsed by the real Nix and evaluated against stub inputs."""

from __future__ import annotations

import pytest

from mariner_dev.nixrender import nix_system
from render_cases import (SPEC_NAMES, STUB_KEY, GOLDEN, evaluated, nix_parse,  # noqa: F401
                          rendered)

MARINER_URL = "github:mksafavi/nix-mariner/a34eea014f697d640cf1fc51df94db8ae164028d"


def test_every_rendered_file_parses(rendered):  # noqa: F811
    files = [p for r in rendered.values() for p in r.directory.rglob("*.nix")]
    # flake.nix, vm.nix and every copied module, for every case
    assert len(files) == sum(sum(rel.endswith(".nix") for rel in r.flake.files)
                             for r in rendered.values())
    nix_parse(files + sorted(GOLDEN.rglob("*.nix")))


def test_parse_check_can_fail(tmp_path):
    good, bad = tmp_path / "good.nix", tmp_path / "bad.nix"
    good.write_text("{ a = 1; }")
    bad.write_text('{ a = "unterminated; }')
    nix_parse([good])
    # a bad file after a good one is still found: one call parses every file it is given
    with pytest.raises(AssertionError, match="bad.nix does not parse"):
        nix_parse([good, bad])


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_flake_shape(evaluated, rendered, name):  # noqa: F811
    e, r = evaluated[name], rendered[name]
    assert e["names"] == [r.cfg.name]            # nixosConfigurations.<name> = the VM name
    assert e["inputs"] == {"mariner": {"url": MARINER_URL}}
    assert e["description"] == f"mariner VM {r.cfg.name}"
    assert e["system"] == nix_system()
    assert sorted(e["configKeys"]) == ["modules", "system"]
    assert e["modules"][0] == "<mariner-module>"
    assert e["modules"][1] == f"path:{r.directory}/vm.nix"
    assert e["modules"][2:] == [f"path:{r.directory}/{rel}" for rel in sorted(
        {"/".join(k.split("/")[:2]) for k in r.flake.files if k.startswith("modules/")})]
    assert all(e["extraAreFunctions"])


def _common(vm, *, name, cid, user="vm", uid=1000, cpus, mem, hypervisor="qemu"):
    assert vm["networking"]["hostName"] == name
    assert vm["mariner"]["cid"] == cid
    assert vm["mariner"]["username"] == user
    assert vm["mariner"]["ssh"]["authorizedKey"] == STUB_KEY
    assert vm["users"]["users"][user]["uid"] == {"_type": "override", "priority": 50,
                                                 "content": uid}
    assert vm["microvm"]["vcpu"] == cpus
    assert vm["microvm"]["mem"] == mem
    assert vm["microvm"]["hypervisor"] == hypervisor


def _share(tag, source, mount, ro=False):
    return {"proto": "virtiofs", "tag": tag, "source": str(source), "mountPoint": mount,
            "socket": f"virtiofs-{tag}.sock", "readOnly": ro}


def _storage(persist=8192, nix_store=32768, docker=32768):
    return {"persistSizeMiB": persist, "nixStoreSizeMiB": nix_store, "dockerSizeMiB": docker}


def test_minimal(evaluated, rendered):  # noqa: F811
    vm, r = evaluated["example-minimal"]["vm"], rendered["example-minimal"]
    _common(vm, name="example-minimal", cid=7, cpus=2, mem=4096)
    assert vm["microvm"]["shares"] == [_share("workspace", r.project,
                                              "/workspaces/example-minimal")]
    assert vm["mariner"]["storage"] == _storage()
    assert vm["mariner"]["docker"] == {"enable": False}
    # bridge mode keeps nix-mariner's own tap interface and guest network
    assert "interfaces" not in vm["microvm"] and "forwardPorts" not in vm["microvm"]
    assert "network" not in vm["mariner"]
    assert "environment" not in vm and "groups" not in vm["users"]


def test_webapp_user_mode(evaluated, rendered):  # noqa: F811
    vm, r = evaluated["example-webapp"]["vm"], rendered["example-webapp"]
    _common(vm, name="webapp", cid=8, cpus=4, mem=4096)
    assert vm["microvm"]["interfaces"] == [
        {"type": "user", "id": "mariner-user", "mac": "02:00:00:00:00:08"}]
    assert vm["microvm"]["forwardPorts"] == [
        {"from": "host", "proto": "tcp", "host": {"address": "127.0.0.1", "port": 2222},
         "guest": {"port": 22}}]
    assert vm["mariner"]["network"] == {"address": "10.0.2.15/24", "gateway": "10.0.2.2",
                                        "dns": "10.0.2.3"}
    assert vm["environment"]["systemPackages"] == [
        "git", "gnumake", "nodejs_22", "python312", "python312Packages.pip", "postgresql_16"]
    assert vm["environment"]["variables"] == {
        "APP_ENV": "development", "DATABASE_URL": "postgres://localhost:5432/app"}
    assert vm["microvm"]["shares"] == [_share("workspace", r.project, "/workspaces/webapp")]


def test_docker_share_module(evaluated, rendered):  # noqa: F811
    vm, r = evaluated["example-docker"]["vm"], rendered["example-docker"]
    _common(vm, name="docker-lab", cid=9, cpus=4, mem=8192)
    assert vm["mariner"]["docker"] == {"enable": True}
    assert vm["mariner"]["storage"] == _storage(persist=16384, docker=65536)
    assert vm["microvm"]["shares"] == [
        _share("workspace", r.project, "/workspaces/docker-lab"),
        _share("data", r.project / "datasets", "/data", ro=True)]
    assert vm["environment"]["systemPackages"] == ["docker-compose", "jq"]
    assert len(evaluated["example-docker"]["modules"]) == 3


def test_bridge_interface_and_gid(evaluated, rendered):  # noqa: F811
    vm, r = evaluated["bridge-interface-gid"]["vm"], rendered["bridge-interface-gid"]
    _common(vm, name="lab", cid=42, user="dev", uid=1234, cpus=6, mem=3072,
            hypervisor="crosvm")
    assert vm["users"]["groups"] == {"dev": {"gid": 2345}}
    assert vm["users"]["users"]["dev"]["group"] == {"_type": "override", "priority": 50,
                                                    "content": "dev"}
    assert vm["microvm"]["interfaces"] == [
        {"type": "tap", "id": "microvm-lab", "mac": "02:00:00:00:00:2a"}]
    assert "forwardPorts" not in vm["microvm"]
    assert vm["microvm"]["shares"] == [_share("workspace", r.project, "/srv/lab")]
    assert vm["environment"]["systemPackages"] == [
        "ripgrep", "python312Packages.pip", "haskellPackages.lens"]


def test_user_mode_with_shares(evaluated, rendered):  # noqa: F811
    vm, r = evaluated["user-shares"]["vm"], rendered["user-shares"]
    _common(vm, name="9lives", cid=200, cpus=1, mem=512)
    assert vm["microvm"]["interfaces"] == [
        {"type": "user", "id": "mr-user0", "mac": "02:00:00:00:00:c8"}]
    assert vm["microvm"]["forwardPorts"][0]["host"] == {"address": "127.0.0.1", "port": 2299}
    home = r.directory.parent.parent / "home"
    assert vm["microvm"]["shares"] == [
        _share("workspace", r.project, "/workspaces/9lives"),
        _share("data", r.project / "data", "/data", ro=True),
        _share("app-cache", home / "cache dir", "/var/cache/app")]
    assert vm["mariner"]["storage"] == _storage(persist=1024, nix_store=4096, docker=2048)
    assert vm["mariner"]["docker"] == {"enable": True}
    assert vm["environment"]["variables"] == {"APP_ENV": "test", "EMPTY": ""}


def test_modules_case(evaluated):  # noqa: F811
    e = evaluated["modules"]
    assert e["names"] == ["let"]
    assert [m.rsplit("/", 1)[-1] for m in e["modules"][1:]] == [
        "vm.nix", "0-extra-module.nix", "1-dirmod"]
