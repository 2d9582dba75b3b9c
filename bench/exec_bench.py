#!/usr/bin/env python3
"""`mariner exec` against OpenSSH, same guest, same account, same run (not a timed test).

    python3 bench/exec_bench.py [--runs N] [--mib M]

Starts a real sshd on 127.0.0.1 as the guest (tests/support/guest_sshd.py; as root it logs in
as the dedicated `mariner-guest` account), writes mariner's ssh-config for it, and measures:

- latency of `true`: mariner exec through the agent, mariner exec without it
  (MARINER_AGENT=off), `ssh -F <generated config> mariner-<name> true`, and the same with a
  ControlMaster already open; prints medians and the ratios the issue sets as targets
  (agent <= 0.25x OpenSSH without ControlMaster, <= 4x with one);
- throughput of `cat` of M MiB (default 200) from a file to /dev/null, and the peak memory
  of both mariner processes (the client, and the agent's growth) against the data size.

Python start-up is printed too: mariner's client pays it on every call and OpenSSH does not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from guest_project import guest_project, mariner_command


def median_seconds(argv: list[str], runs: int, env: dict, **kw) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, **kw)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hwm_kib(pid: int, field: str = "VmHWM") -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed_cat(argv: list[str], source: Path, env: dict, cwd=None) -> tuple[float, int]:
    """Seconds to push `source` through argv (stdin -> stdout /dev/null); client peak RSS KiB."""
    with open(source, "rb") as stdin:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=subprocess.DEVNULL, cwd=cwd)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, hwm_kib(proc.pid))
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with {proc.returncode}")
    return elapsed, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mib", type=int, default=200)
    args = parser.parse_args()

    control = Path(f"/tmp/mrb-cm-{os.getpid()}")
    with guest_project("mariner-bench-", "mrb-") as run, _master_closed(control):
        base, env, proj = run.base, run.env, run.project
        from mariner_dev import remote, sshconfig

        sshconfig.write_entry(proj.cfg, proj.record)
        cfg_file = str(sshconfig.paths.ssh_config_file())
        host = f"mariner-{proj.name}"
        ssh = shutil.which("ssh")
        mariner = mariner_command()
        agent_env = dict(env, MARINER_AGENT="require")
        direct_env = dict(env, MARINER_AGENT="off")
        cwd = proj.dir

        # Warm-up: bytecode, the exec cache, the agent, OpenSSH's known key.
        for _ in range(3):
            subprocess.run([*mariner, "exec", "--", "true"], env=agent_env, cwd=cwd, check=True)
        subprocess.run([ssh, "-F", cfg_file, host, "true"], env=env, check=True)

        runs = args.runs
        py = median_seconds([sys.executable, "-c", "pass"], runs, env)
        agent = median_seconds([*mariner, "exec", "--", "true"], runs, agent_env, cwd=cwd)
        direct = median_seconds([*mariner, "exec", "--", "true"], max(5, runs // 4),
                                direct_env, cwd=cwd)
        plain = median_seconds([ssh, "-F", cfg_file, host, "true"], runs, env)
        subprocess.run([ssh, "-F", cfg_file, "-o", "ControlMaster=yes", "-o",
                        f"ControlPath={control}", "-o", "ControlPersist=120", "-fN", host],
                       env=env, check=True)
        muxed = median_seconds([ssh, "-F", cfg_file, "-o", "ControlMaster=no", "-o",
                                f"ControlPath={control}", host, "true"], runs, env)

        print(f"latency of `true` (median of {runs}):")
        print(f"  python -c pass (start-up alone)     {py * 1e3:7.1f} ms")
        print(f"  mariner exec, agent                 {agent * 1e3:7.1f} ms")
        print(f"  mariner exec, direct (no agent)     {direct * 1e3:7.1f} ms")
        print(f"  ssh -F cfg (no ControlMaster)       {plain * 1e3:7.1f} ms")
        print(f"  ssh -F cfg (ControlMaster open)     {muxed * 1e3:7.1f} ms")
        print(f"  agent / ssh                         {agent / plain:7.2f}x   (target <= 0.25x)")
        print(f"  agent / ssh with ControlMaster      {agent / muxed:7.2f}x   (target <= 4x)")
        print(f"  (agent - python start-up) / muxed   {(agent - py) / muxed:7.2f}x")

        size = args.mib * 1024 * 1024
        source = base / "payload"
        with open(source, "wb") as fh:
            block = os.urandom(1024 * 1024)
            for _ in range(args.mib):
                fh.write(block)
        from mariner_dev.remote.client import agent_pid as find_agent

        agent_pid = find_agent(proj.name)
        agent_rss_before = hwm_kib(agent_pid, "VmRSS")
        agent_peak = [agent_rss_before]
        stop = threading.Event()

        def watch_agent():
            while not stop.is_set():
                agent_peak[0] = max(agent_peak[0], hwm_kib(agent_pid, "VmRSS"))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch_agent)
        watcher.start()
        m_time, m_peak = timed_cat([*mariner, "exec", "--", "cat"], source, agent_env, cwd)
        stop.set()
        watcher.join()
        s_time, s_peak = timed_cat([ssh, "-F", cfg_file, host, "cat"], source, env)
        d_time, d_peak = timed_cat([*mariner, "exec", "--", "cat"], source, direct_env, cwd)
        print(f"\n`cat` of {args.mib} MiB (stdin from a file, stdout to /dev/null):")
        print(f"  mariner exec, agent   {args.mib / m_time:7.1f} MiB/s   client peak RSS "
              f"{m_peak / 1024:6.1f} MiB; agent RSS {agent_rss_before / 1024:.1f} -> peak "
              f"{agent_peak[0] / 1024:.1f} MiB")
        print(f"  mariner exec, direct  {args.mib / d_time:7.1f} MiB/s   client peak RSS "
              f"{d_peak / 1024:6.1f} MiB")
        print(f"  ssh -F cfg            {args.mib / s_time:7.1f} MiB/s   client peak RSS "
              f"{s_peak / 1024:6.1f} MiB")
        print(f"  agent / ssh throughput {s_time / m_time:6.2f}x   (target >= 0.8x)")
        print(f"  direct / ssh throughput {s_time / d_time:5.2f}x")
        del size
    return 0


@contextmanager
def _master_closed(control: Path):
    """The ControlMaster on `control` (if one was opened) is told to exit at the end."""
    try:
        yield
    finally:
        subprocess.run([shutil.which("ssh") or "ssh", "-o", f"ControlPath={control}", "-O",
                        "exit", "x"], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
