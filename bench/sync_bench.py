#!/usr/bin/env python3
"""Dotfiles sync benchmark: mariner against rsync -a and scp -r over OpenSSH, same guest.

    python3 bench/sync_bench.py [--files 2000] [--mib 50] [--runs 3] [--edits 100]

The guest is a real sshd on 127.0.0.1 (tests/support/guest_sshd.py) with its dedicated account;
every tool logs into that same account with the same key. Measured:
  initial   a fresh copy of the tree: `mariner sync` (the CLI) served by the per-VM agent (the
            default path: the agent syncs on the connection and SFTP client it holds), the
            CLI with MARINER_AGENT=off (a new asyncssh connection per call), mariner on a
            held connection in-process (the engine alone), `rsync -a`, `scp -r`
  no-change the same again with nothing changed (scp has no incremental mode)
  watch     edit -> content visible in the guest, p50/p95 over --edits edits
Prints medians and ratios against rsync measured in this run. Needs root (guest account).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.guest_sshd import (DEFAULT_GUEST_USER, GuestSshd, ensure_guest_user,  # noqa: E402
                                free_port, generate_client_key)


def make_tree(top: Path, files: int, total_bytes: int, seed: int = 7) -> None:
    """`files` files in 50 directories; a few large, many small, `total_bytes` in all."""
    rng = random.Random(seed)
    large = max(1, files // 20)
    small_total = total_bytes // 5
    small_sizes = [rng.randint(1, 2 * small_total // (files - large)) for _ in range(files - large)]
    large_each = (total_bytes - sum(small_sizes)) // large
    sizes = small_sizes + [large_each] * large
    rng.shuffle(sizes)
    dirs = 50
    for i, size in enumerate(sizes):
        d = top / f"d{i % dirs:02d}"
        if i % 7 == 0:
            d = d / "sub"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(rng.randbytes(size))


def run(argv: list[str], env=None) -> None:
    proc = subprocess.run(argv, capture_output=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace')[-800:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--edits", type=int, default=100)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the guest is a dedicated account")

    base = Path(tempfile.mkdtemp(prefix="mariner-bench-", dir="/tmp"))
    os.chmod(base, 0o755)
    uid, guest_home = ensure_guest_user(DEFAULT_GUEST_USER)
    gid = os.stat(guest_home).st_gid
    host_home = base / "home"
    tag = f".mt-bench-{secrets.token_hex(3)}"
    env = {"HOME": str(host_home), "MARINER_HOME": str(base / "mariner"),
           "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config"),
           "XDG_RUNTIME_DIR": str(base / "run"), "MARINER_AGENT": "off", "NO_COLOR": "1"}
    os.environ.update(env)
    (base / "run").mkdir(mode=0o700)
    sshd = None
    dest = guest_home / tag
    try:
        key = generate_client_key(base / "client" / "id_ed25519")
        authorized = base / "authorized_keys"
        shutil.copy(key.with_name(key.name + ".pub"), authorized)
        os.chmod(authorized, 0o644)
        sshd = GuestSshd(base / "sshd", free_port(), DEFAULT_GUEST_USER, authorized)
        sshd.start()
        print(f"building {args.files} files / {args.mib} MiB ...", file=sys.stderr)
        make_tree(host_home / tag, args.files, args.mib * 1024 * 1024)

        project = base / "project"
        project.mkdir()
        (project / "mariner.toml").write_text(
            f'[vm]\nname = "bench"\nuser = "{DEFAULT_GUEST_USER}"\n'
            f'[network]\nmode = "user"\nssh_port = {sshd.port}\n'
            f'[ssh]\nidentity = "{key}"\n[dotfiles]\nfiles = ["~/{tag}"]\n')
        from mariner_dev import paths
        from mariner_dev.config import load_project
        from mariner_dev.remote.trust import pin_host_key
        from mariner_dev.state import Registry, VmRecord

        cfg = load_project(project_dir=project)
        record = VmRecord(name="bench", project=str(project), config_file=str(cfg.config_file),
                          cid=9, network_mode="user", ssh_port=sshd.port, created=True)
        with Registry().transaction() as vms:
            vms["bench"] = record
        pin_host_key(paths.known_hosts_file(), "mariner-bench", sshd.host_public_key())
        known = base / "known_hosts"
        known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_public_key()}\n")
        ssh = (f"ssh -F /dev/null -i {key} -p {sshd.port} -o UserKnownHostsFile={known} "
               f"-o StrictHostKeyChecking=yes -o BatchMode=yes")
        remote = f"{DEFAULT_GUEST_USER}@127.0.0.1"

        def wipe():
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(paths.vm_dir("bench"), ignore_errors=True)

        def prepare_dest():
            wipe()
            dest.mkdir()
            os.chown(dest, uid, gid)

        cli = [sys.executable, "-m", "mariner_dev", "sync", "-C", str(project)]
        # An installed mariner has compiled bytecode: do not make every call recompile it.
        cli_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cli_env["PYTHONPATH"] = str(REPO)
        agent_env = dict(cli_env, MARINER_AGENT="require")
        run(cli + ["--dry-run"], agent_env)   # starts the agent (as `up` would have)
        rsync = ["rsync", "-a", "-e", ssh, f"{host_home / tag}/", f"{remote}:{tag}/"]
        scp = ["scp", "-r", "-q", "-p", "-F", "/dev/null", "-i", str(key), "-P", str(sshd.port),
               "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
               "-o", "BatchMode=yes", str(host_home / tag), f"{remote}:"]

        # Rounds interleave the tools, so that load from elsewhere on the machine hits all alike.
        samples: dict[str, list[float]] = {}

        def timed(name, fn, before=None):
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            samples.setdefault(name, []).append(time.perf_counter() - t)

        for _ in range(args.runs):
            # No-change runs are short, so load from elsewhere moves them most: three of each
            # a round (each tool's no-change runs follow its own initial copy).
            timed("rsync initial", lambda: run(rsync), before=wipe)
            for _ in range(3):
                timed("rsync no-change", lambda: run(rsync))
            timed("scp initial", lambda: run(scp), before=wipe)
            timed("mariner initial (CLI, agent)", lambda: run(cli, agent_env), before=wipe)
            for _ in range(3):
                timed("mariner no-change (CLI, agent)", lambda: run(cli, agent_env))
            timed("mariner initial (CLI, MARINER_AGENT=off)", lambda: run(cli, cli_env),
                  before=wipe)
            timed("mariner no-change (CLI, MARINER_AGENT=off)", lambda: run(cli, cli_env))
            held_initial, held_nochange = asyncio.run(held_connection(cfg, record, wipe))
            samples.setdefault("mariner initial (held connection)", []).append(held_initial)
            samples.setdefault("mariner no-change (held connection)", []).append(held_nochange)
        results = {name: statistics.median(values) for name, values in samples.items()}
        latencies = asyncio.run(watch_latency(cfg, record, args, host_home / tag, dest))

        print()
        print(f"{args.files} files, {args.mib} MiB, medians of {args.runs} runs; "
              f"guest: OpenSSH sshd on 127.0.0.1, account {DEFAULT_GUEST_USER}")
        for name, value in results.items():
            base_name = "rsync initial" if "initial" in name else "rsync no-change"
            ratio = value / results[base_name]
            print(f"  {name:<44} {value * 1000:8.0f} ms   {ratio:5.2f}x {base_name}")
        p50 = statistics.median(latencies)
        p95 = sorted(latencies)[max(0, int(len(latencies) * 0.95) - 1)]
        print(f"  watch latency over {len(latencies)} edits: p50 {p50 * 1000:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
        print("targets: initial <= 1.2x rsync; no-change <= 1.0x rsync; watch p95 <= 300 ms")
    finally:
        from mariner_dev.remote.client import stop_agent

        stop_agent("bench")
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0


async def held_connection(cfg, record, wipe) -> tuple[float, float]:
    """An initial and a no-change sync on one already open connection (the agent's case)."""
    from mariner_dev.remote.session import connect
    from mariner_dev.remote.target import target_for
    from mariner_dev.sync import spec_for
    from mariner_dev.sync.coalesce import open_sftp
    from mariner_dev.sync.engine import sync_over

    conn = await connect(target_for(cfg, record))
    sftp = await open_sftp(conn)
    spec = spec_for(cfg)
    try:
        wipe()
        t = time.perf_counter()
        await sync_over(conn, spec, sftp=sftp)
        initial = time.perf_counter() - t
        t = time.perf_counter()
        report = await sync_over(conn, spec, sftp=sftp)
        nochange = time.perf_counter() - t
        assert report.bytes_sent == 0 and not report.changes, report.changes[:3]
    finally:
        sftp.exit()
        conn.close()
        await conn.wait_closed()
    return initial, nochange


async def watch_latency(cfg, record, args, src: Path, dest: Path) -> list[float]:
    """Edit a file, wait until the guest has the new content; `--edits` times."""
    from mariner_dev.remote.target import target_for
    from mariner_dev.sync import spec_for
    from mariner_dev.sync.link import GuestLink
    from mariner_dev.sync.watch import watch_over

    ready = asyncio.Event()
    link = GuestLink(target_for(cfg, record))
    task = asyncio.ensure_future(watch_over(spec_for(cfg), link, lambda line: None, ready.set))
    await asyncio.wait_for(ready.wait(), 120)
    files = sorted(src.rglob("*.txt"))[:20]
    latencies = []
    for i in range(args.edits):
        path = files[i % len(files)]
        payload = f"edit {i} {secrets.token_hex(8)}\n".encode()
        guest_file = dest / path.relative_to(src)
        t = time.perf_counter()
        path.write_bytes(payload)
        while True:
            try:
                if guest_file.read_bytes() == payload:
                    break
            except OSError:
                pass
            if time.perf_counter() - t > 10:
                raise SystemExit(f"watch did not deliver edit {i} within 10 s")
            await asyncio.sleep(0.002)
        latencies.append(time.perf_counter() - t)
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await link.close()
    return latencies


if __name__ == "__main__":
    sys.exit(main())
