#!/usr/bin/env python3
"""Soak: many `mariner exec` calls through one agent; does the agent leak? (not a timed test)

    python3 bench/soak_bench.py [--execs 1000] [--parallel 4] [--warmup 20]

Starts a real sshd on 127.0.0.1 as the guest (tests/support/guest_sshd.py), runs `--warmup`
execs, then records the agent's RSS (VmRSS) and open descriptors (/proc/<pid>/fd), runs
`--execs` more (`--parallel` at a time, each `sh -c 'echo N; exit N%7'` with stdin from
/dev/null, which the agent streams, every output and status checked), and records them again.
Targets: the same number of fds at the end as at the start, RSS within 10%. Exits 1 when an
exec answered wrongly, the agent changed, or a target is missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from guest_project import guest_project, mariner_command


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execs", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    with guest_project("mariner-soak-", "mrs-") as run:
        env, proj = run.env, run.project
        env["MARINER_AGENT"] = "require"
        from mariner_dev.remote.client import agent_pid

        mariner = mariner_command()

        def one(n: int) -> str | None:
            proc = subprocess.run([*mariner, "exec", "--", "sh", "-c", f"echo {n}; exit {n % 7}"],
                                  env=env, cwd=proj.dir, stdin=subprocess.DEVNULL,
                                  capture_output=True)
            if (proc.returncode, proc.stdout, proc.stderr) != (n % 7, f"{n}\n".encode(), b""):
                return f"exec {n}: status {proc.returncode}, stdout {proc.stdout[:80]!r}, " \
                       f"stderr {proc.stderr[:200]!r}"
            return None

        for n in range(args.warmup):
            if one(n):
                raise SystemExit(one(n))
        pid = agent_pid(proj.name)
        rss0, fds0 = rss_kib(pid), fds(pid)
        started = time.monotonic()
        with ThreadPoolExecutor(args.parallel) as pool:
            errors = [e for e in pool.map(one, range(args.execs)) if e]
        elapsed = time.monotonic() - started
        time.sleep(1.0)            # the last clients' descriptors are closed
        pid_end = agent_pid(proj.name)
        rss1, fds1 = rss_kib(pid), fds(pid)
        growth = (rss1 - rss0) / rss0 * 100
        print(f"{args.execs} execs through one agent ({args.parallel} at a time) in "
              f"{elapsed:.1f} s ({elapsed / args.execs * 1e3:.1f} ms each), after "
              f"{args.warmup} warm-up execs")
        print(f"  wrong answers        {len(errors)}")
        for line in errors[:5]:
            print(f"    {line}")
        print(f"  agent pid            {pid} -> {pid_end}")
        print(f"  agent open fds       {len(fds0)} -> {len(fds1)}   (target: equal)")
        print(f"  agent RSS            {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB "
              f"({growth:+.1f}%)   (target: within 10%)")
        if fds0 != fds1:
            print("  fds at start only:   " + ", ".join(sorted(set(fds0) - set(fds1))))
            print("  fds at end only:     " + ", ".join(sorted(set(fds1) - set(fds0))))
        failed = bool(errors) or pid_end != pid or len(fds0) != len(fds1) or abs(growth) > 10
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
