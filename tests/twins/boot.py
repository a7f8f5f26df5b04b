"""Keep a twin booted across reboots: `python -m tests.twins.boot -- systemd-nspawn ARGS...`.

systemd-nspawn exits with 133 when the machine inside asked for a reboot (`systemctl reboot`),
where a droplet would come back up by itself; this runs the same command again. Any other exit
(a poweroff, a crash) ends the loop with nspawn's code. SIGTERM is passed to nspawn (which asks
the twin's systemd for a clean poweroff) and ends the loop. One line per boot on stdout, with
its wall-clock time, so a drill can tell when the twin came back.

A twin that rebooted runs at REBOOT_NICE: twins share this machine's CPUs with each other and
with the drill's client, so a boot's burst (systemd, cloud-init, the app's and the scripts'
Python starting at once) would starve the peer that serves meanwhile, which droplets, each on
its own vCPUs, never do to each other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

REBOOT_RC = 133
REBOOT_NICE = 10


def _reniced() -> None:
    os.nice(REBOOT_NICE)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m tests.twins.boot -- systemd-nspawn ARGS...", file=sys.stderr)
        return 2
    stopping = False
    child: subprocess.Popen | None = None

    def on_term(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    boots = 0
    while True:
        boots += 1
        print(f"twin-boot: boot {boots} at {time.time():.3f}", flush=True)
        child = subprocess.Popen(argv, preexec_fn=_reniced if boots > 1 else None)
        rc = child.wait()
        print(f"twin-boot: nspawn exited {rc} at {time.time():.3f}", flush=True)
        if stopping or rc != REBOOT_RC:
            return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
