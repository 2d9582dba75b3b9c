#!/usr/bin/env python3
"""A no-op `mariner up` on a running VM against OpenSSH's `ssh true`, same guest, same run.

    python3 bench/up_bench.py [--runs N]

Plays the host with the fake microvm/systemctl/journalctl (tests/fakehost/bin) and the guest
with a real sshd on 127.0.0.1 (user-mode networking), all in a temporary MARINER_HOME, HOME
and microvm directory. Boots the VM once with `mariner up`, then times repeated no-op
`mariner up` runs and `ssh -F <mariner's ssh-config> mariner-<name> true` (no ControlMaster)
and prints the medians and their ratio (target: at most 1.5x). Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.guest_sshd import ensure_guest_user  # noqa: E402


def median(argv: list[str], runs: int, env: dict, cwd: Path) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    user = "mariner-guest" if os.geteuid() == 0 else os.environ.get("USER", "")
    uid, _ = ensure_guest_user(user) if os.geteuid() == 0 else (os.getuid(), None)
    base = Path(tempfile.mkdtemp(prefix="mrb-", dir="/tmp"))
    os.chmod(base, 0o755)
    project = base / "bench"
    project.mkdir()
    os.chown(project, uid, -1)
    name = "b" + uuid.uuid4().hex[:8]
    (project / "mariner.toml").write_text(
        f'[vm]\nname = "{name}"\nuser = "{user}"\nuid = {uid}\n\n'
        f'[network]\nmode = "user"\n\n[workspace]\nmount = "{base}/guest/ws"\n')
    env = dict(os.environ)
    env.update({
        "HOME": str(base / "home"), "MARINER_HOME": str(base / "mariner-home"),
        "MARINER_MICROVMS_DIR": str(base / "microvms"), "MARINER_SUDO": "",
        "MARINER_GCROOTS_DIR": str(base / "gcroots"), "XDG_RUNTIME_DIR": str(base / "run"),
        "XDG_CONFIG_HOME": str(base / "config"), "NO_COLOR": "1",
        "MARINER_FAKEHOST_LOG": str(base / "fakehost.jsonl"),
        "PATH": f"{REPO / 'tests' / 'fakehost' / 'bin'}{os.pathsep}{os.environ['PATH']}",
    })
    for key in ("HOME", "MARINER_MICROVMS_DIR", "XDG_RUNTIME_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    os.chmod(env["XDG_RUNTIME_DIR"], 0o700)
    log = Path(env["MARINER_FAKEHOST_LOG"])
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed mariner runs from cached bytecode
    mariner = [os.environ.get("MARINER_BENCH_PYTHON", sys.executable), "-m", "mariner_dev"]
    try:
        subprocess.run([*mariner, "up"], env=env, cwd=project, check=True,
                       stdout=subprocess.DEVNULL)
        ssh_config = Path(env["MARINER_HOME"]) / "ssh_config"
        ssh = ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", f"mariner-{name}", "true"]
        up_noop = median([*mariner, "up"], args.runs, env, project)
        ssh_true = median(ssh, args.runs, env, project)
        print(f"no-op `mariner up`:            {up_noop * 1000:7.1f} ms (median of {args.runs})")
        print(f"`ssh mariner-{name} true`:  {ssh_true * 1000:7.1f} ms (OpenSSH, no ControlMaster)")
        ratio = up_noop / ssh_true
        print(f"ratio: {ratio:.2f}x  (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
        # The host here is played by Python scripts: each `systemctl show` costs a Python
        # start-up that a real systemctl (a few ms) does not. Show the ratio without it too.
        fake = median(["systemctl", "show", f"microvm@{name}"], args.runs, env, project)
        log.write_text("")
        subprocess.run([*mariner, "up"], env=env, cwd=project, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        calls = sum(1 for line in log.read_text().splitlines() if line.strip())
        adjusted = (up_noop - calls * fake) / ssh_true
        print(f"a no-op up runs {calls} host command(s); the fake host's `systemctl show` costs "
              f"{fake * 1000:.1f} ms each (a real one a few ms): without it, "
              f"{adjusted:.2f}x ssh")
    finally:
        subprocess.run([*mariner, "destroy", "--force"], env=env, cwd=project,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
