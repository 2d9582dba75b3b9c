"""Every flake mariner renders, evaluated through the real nix-mariner and microvm.nix modules.

The goldens' projects, the examples, the `mariner init` templates and the valid-config corpus
are rendered, then evaluated in one nix-instantiate call with nixpkgs' lib.evalModules and the
pinned modules from ../shared/upstream/src (tests/support/upstream.py). The values mariner
relies on are read from that evaluation and compared with what mariner.toml asked for, so a
difference between what mariner assumes and what nix-mariner does fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mariner_dev.model import DEFAULT_GID
from mariner_dev.project import init_text, templates
from render_cases import SPECS, STUB_KEY, Spec, isolated, render_spec
from support.upstream import PINS, evaluate, evaluate_one, upstream_src, virtiofsd_commands

REPO = Path(__file__).resolve().parents[2]
VALID = sorted((REPO / "tests" / "config" / "valid").glob("*.toml"))


def _corpus_specs() -> list[Spec]:
    """The init templates and the valid-config corpus as render specs (cid / port as
    allocation would give them)."""
    specs = [Spec("template-default", cid=30, toml=init_text(Path("/x/template-default")))]
    for index, name in enumerate(templates()):
        text = init_text(Path(f"/x/template-{name}"), name)
        example = REPO / "examples" / name
        files = {p.relative_to(example).as_posix(): p.read_text()
                 for p in example.rglob("*") if p.is_file() and p.name != "mariner.toml"}
        dirs = tuple(p.relative_to(example).as_posix() for p in example.rglob("*")
                     if p.is_dir() and not any(p.iterdir()))
        specs.append(Spec(f"template-{name}", cid=31 + index, ssh_port=2231 + index, toml=text,
                          files=files, dirs=dirs))
    for index, path in enumerate(VALID):
        text = path.read_text()
        cid = re.search(r"^cid = (\d+)", text, re.M)
        port = re.search(r"^ssh_port = (\d+)", text, re.M)
        specs.append(Spec(f"valid-{path.stem}", cid=int(cid.group(1)) if cid else 40 + index,
                          ssh_port=int(port.group(1)) if port else 2240 + index, toml=text))
    return specs


ALL_SPECS = SPECS + _corpus_specs()


@pytest.fixture(scope="module")
def evaluated_upstream(tmp_path_factory):
    """name -> (Rendered, evaluation) for every spec; one nix-instantiate call for all."""
    upstream_src()  # missing sources fail before rendering anything
    root = tmp_path_factory.mktemp("upstream")
    with pytest.MonkeyPatch.context() as mp:
        home = isolated(mp, root)
        (home / ".gitconfig").write_text("[user]\n")
        rendered = {}
        for spec in ALL_SPECS:
            rendered[spec.name] = render_spec(spec, root, home)
    results = evaluate({name: r.directory for name, r in rendered.items()})
    return {name: (rendered[name], results[name]) for name in rendered}


@pytest.mark.parametrize("name", [s.name for s in ALL_SPECS])
def test_the_real_modules_build_what_mariner_asked_for(evaluated_upstream, name):
    r, e = evaluated_upstream[name]
    cfg, cid = r.cfg, r.spec.cid
    assert e["failedAssertions"] == [] and e["warnings"] == []
    # identity: the nixosConfigurations attribute is the VM name (microvm -c builds it)
    assert e["names"] == [cfg.name] and e["hostName"] == cfg.name
    assert e["cid"] == cid
    assert (e["mem"], e["vcpu"], e["hypervisor"]) == (cfg.vm.memory_mib, cfg.vm.cpus,
                                                       cfg.vm.hypervisor)
    # the guest user mariner logs in as
    user = e["user"]
    assert e["username"] == user["name"] == cfg.vm.user
    assert user["uid"] == cfg.vm.uid and user["isNormalUser"] and user["shell"] == "bash"
    assert "wheel" in user["extraGroups"]           # nix-mariner: passwordless sudo
    if cfg.vm.gid == DEFAULT_GID:
        assert user["group"] == "users" and cfg.vm.user not in e["groups"]
    else:
        assert user["group"] == cfg.vm.user and e["groups"][cfg.vm.user] == cfg.vm.gid
    assert user["keys"] == [STUB_KEY]
    # nix-mariner authorizes the same key for root
    assert e["rootKeys"] == [STUB_KEY]
    # shares: nix-mariner's 9p store, then the workspace and [[shares]] over virtiofs
    expected = [{"tag": "ro-store", "source": "/nix/store", "mountPoint": "/nix/.ro-store",
                 "proto": "9p", "readOnly": False, "socket": None},
                {"tag": "workspace", "source": str(cfg.project_dir),
                 "mountPoint": cfg.workspace_mount, "proto": "virtiofs", "readOnly": False,
                 "socket": "virtiofs-workspace.sock"}]
    expected += [{"tag": s.tag, "source": str(s.source), "mountPoint": s.target,
                  "proto": "virtiofs", "readOnly": s.readonly,
                  "socket": f"virtiofs-{s.tag}.sock"} for s in cfg.shares]
    assert e["shares"] == expected
    for share in expected:
        assert e["mounts"][share["mountPoint"]] == {"device": share["tag"],
                                                    "fsType": share["proto"]}
    # virtiofsd: one per virtiofs share, serving its source, read-only where asked
    virtiofs = [s for s in expected if s["proto"] == "virtiofs"]
    assert sorted(e["virtiofsd"]) == sorted(s["tag"] for s in virtiofs)
    for share in virtiofs:
        argv = e["virtiofsd"][share["tag"]]
        assert f"--socket-path={share['socket']}" in argv
        assert f"--shared-dir={share['source']}" in argv
        assert ("--readonly" in argv) == share["readOnly"]
    # network
    mac = f"02:00:00:00:00:{cid:02x}"
    if cfg.network.mode == "user":
        assert e["interfaces"] == [{"type": "user", "id": cfg.network.interface or "mariner-user",
                                    "mac": mac}]
        assert e["forwardPorts"] == [{"from": "host", "proto": "tcp",
                                      "host": {"address": "127.0.0.1", "port": r.spec.ssh_port},
                                      "guest": {"address": "", "port": 22}}]
        assert e["lan"] == {"mac": mac, "address": ["10.0.2.15/24"], "gateway": "10.0.2.2",
                            "dns": [cfg.network.dns or "10.0.2.3"]}
    else:
        assert e["interfaces"] == [{"type": "tap", "id": cfg.network.interface
                                    or f"microvm-{cid}", "mac": mac}]
        assert e["forwardPorts"] == []
        assert e["lan"]["address"] == [f"10.0.0.{cid}/24"]
        assert e["lan"]["gateway"] == "10.0.0.1" and e["lan"]["mac"] == mac
        # nix-mariner leaves DNS unset (resolved's FallbackDNS) unless [network] dns names one
        assert e["lan"]["dns"] == ([cfg.network.dns] if cfg.network.dns else None)
        assert e["network"]["dns"] == cfg.network.dns
    # volumes, at the sizes mariner.toml asked for
    sizes = {"persist.img": cfg.storage.persist_mib, "nix-store.img": cfg.storage.nix_store_mib}
    if cfg.docker_enable:
        sizes["docker.img"] = cfg.storage.docker_mib
    assert {v["image"]: v["size"] for v in e["volumes"]} == sizes
    assert e["docker"] == cfg.docker_enable


def test_the_spread_covers_both_modes_and_extra_shares(evaluated_upstream):
    modes = {r.cfg.network.mode for r, _ in evaluated_upstream.values()}
    assert modes == {"bridge", "user"}
    assert any(r.cfg.shares for r, _ in evaluated_upstream.values())
    assert any(s.readonly for r, _ in evaluated_upstream.values() for s in r.cfg.shares)
    assert any(r.cfg.vm.gid != DEFAULT_GID for r, _ in evaluated_upstream.values())
    assert any(r.cfg.network.interface for r, _ in evaluated_upstream.values())
    assert any(r.cfg.network.dns and r.cfg.network.mode == "bridge"
               for r, _ in evaluated_upstream.values())
    assert {r.cfg.vm.hypervisor for r, _ in evaluated_upstream.values()} == {"qemu", "crosvm"}
    assert {"template-default", "valid-everything"} <= set(evaluated_upstream)


# -- the evaluation can fail: what nix-mariner or microvm.nix reject is seen ----------------------

def _tampered(evaluated_upstream, tmp_path: Path, name: str, edit) -> Path:
    r, _ = evaluated_upstream[name]
    directory = tmp_path / name
    directory.mkdir()
    for rel, data in r.flake.files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    vm = directory / "vm.nix"
    vm.write_text(edit(vm.read_text()))
    return directory


def test_a_duplicate_share_tag_is_an_upstream_assertion(evaluated_upstream, tmp_path):
    directory = _tampered(evaluated_upstream, tmp_path, "example-minimal",
                          lambda t: t.replace('tag = "workspace"', 'tag = "ro-store"'))
    failed = evaluate_one(directory)["failedAssertions"]
    assert any('share tag "ro-store" is used 2 > 1 times' in m for m in failed), failed


def test_forwarded_ports_without_a_user_interface_are_an_upstream_assertion(
        evaluated_upstream, tmp_path):
    def edit(text: str) -> str:
        return text.replace('type = "user"', 'type = "tap"')

    directory = _tampered(evaluated_upstream, tmp_path, "example-webapp", edit)
    failed = evaluate_one(directory)["failedAssertions"]
    assert any("forwardPorts` works only with qemu" in m for m in failed), failed


def test_the_old_option_name_fails_evaluation(evaluated_upstream, tmp_path):
    directory = _tampered(evaluated_upstream, tmp_path, "example-minimal",
                          lambda t: t.replace("mariner.ssh.authorizedKey",
                                              "mariner.hostAuthorizedKey"))
    with pytest.raises(AssertionError, match="hostAuthorizedKey"):
        evaluate_one(directory)


def test_a_plain_uid_conflicts_with_nix_mariners_own(evaluated_upstream, tmp_path):
    """nix-mariner sets uid = 1000 as a plain definition: without mkForce the uid conflicts."""
    directory = _tampered(evaluated_upstream, tmp_path, "bridge-interface-gid",
                          lambda t: t.replace("lib.mkForce 1234", "1234"))
    with pytest.raises(AssertionError, match="conflicting definition values"):
        evaluate_one(directory)


# -- the sources and how to get them ---------------------------------------------------------

def test_the_sources_are_the_pinned_revisions():
    src = upstream_src()
    flake = (src / "nix-mariner" / "flake.nix").read_text()
    assert "nixosModules" in flake and "./modules/host.nix" in flake
    script = (REPO / "scripts" / "upstream-src").read_text()
    for name, (url, rev) in PINS.items():
        assert f"fetch {name} {url} {rev}" in script


def test_missing_sources_fail_with_or_without_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("MARINER_UPSTREAM_SRC", str(tmp_path / "nowhere"))
    for ci in ("true", ""):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="scripts/upstream-src"):
            upstream_src()


def test_virtiofsd_command_reader():
    run = ('exec /nix/store/stub-supervisor/bin/supervisord --configuration '
           '/nix/store/stub-x.conf#{"kind":"text","name":"x.conf","text":"[program:virtiofsd-a]\\n'
           'command=/nix/store/stub-virtiofsd-a#{\\"kind\\":\\"shell\\",\\"name\\":\\"a\\",'
           '\\"text\\":\\"exec /bin/virtiofsd \\\\\\\\\\\\n  --shared-dir=/p \\\\\\\\\\\\n'
           '  --readonly\\\\n\\"}\\n"} "$@"')
    assert virtiofsd_commands(run) == {"a": ["/bin/virtiofsd", "--shared-dir=/p", "--readonly"]}
    assert virtiofsd_commands(None) == {}


# -- the real-VM tier's guest comes from this evaluation --------------------------------------

def test_the_real_vm_guest_is_configured_from_the_evaluation(evaluated_upstream, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(REPO / "tests" / "e2e"))
    sys.modules.pop("realhost", None)
    import realhost

    r, e = evaluated_upstream["user-shares"]
    spec = realhost.guest_spec(r.cfg.name, e)
    assert (spec.hostname, spec.user, spec.uid, spec.group, spec.gid) == (
        "9lives", "vm", 1000, "users", 100)
    assert spec.authorized_key == STUB_KEY and spec.ssh_port == 2299
    assert (spec.cpus, spec.memory_mib, spec.mac) == (1, 512, "02:00:00:00:00:c8")
    # nix-mariner's 9p /nix/store share is left out by name; the virtiofs shares are all there
    assert [(s.tag, s.mount_point, s.read_only) for s in spec.shares] == [
        ("workspace", "/workspaces/9lives", False), ("data", "/data", True),
        ("app-cache", "/var/cache/app", False)]
    assert "ro-store" in realhost.SKIPPED_SHARES
    other = dict(e, shares=e["shares"] + [dict(e["shares"][0], tag="other9p")])
    with pytest.raises(realhost.Refused, match="'other9p' uses proto '9p'"):
        realhost.guest_spec(r.cfg.name, other)
