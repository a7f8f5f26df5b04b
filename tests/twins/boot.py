"""Keep a twin booted across reboots: `python -m tests.twins.boot -- systemd-nspawn ARGS...`.

systemd-nspawn exits with 133 when the machine inside asked for a reboot (`systemctl reboot`),
where a droplet would come back up by itself; this runs the same command again. Any other exit
(a poweroff, a crash) ends the loop with nspawn's code. SIGTERM is passed to nspawn (which asks
the twin's systemd for a clean poweroff) and ends the loop. One line per boot on stdout, with
its wall-clock time, so a drill can tell when the twin came back.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

REBOOT_RC = 133


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
        child = subprocess.Popen(argv)
        rc = child.wait()
        print(f"twin-boot: nspawn exited {rc} at {time.time():.3f}", flush=True)
        if stopping or rc != REBOOT_RC:
            return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
