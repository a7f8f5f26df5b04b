"""keepalived and failover timing profiles.

Every number here moves the failover time; the renderer copies each one's comment into the
rendered keepalived.conf, so the file on the node says why it is what it is.

Measured in the lab (keepalived 2.2.7, `make drill`): see drill-report.json. The architecture
brief's figures: tutorial timings 1.9 s (app fault) / 3.0 s (node death); VRRPv3 at 0.2 s adverts
0.7 s / 0.7 s, before the reserved-IP move.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    vrrp_version: int
    advert_int: str          # seconds, as keepalived reads it ("0.2"); VRRPv2 allows whole seconds only
    check_interval: int      # vrrp_script interval: whole seconds in keepalived 2.2.x
    check_timeout: int
    check_fall: int | None   # None: keepalived's default (1), i.e. the tutorial's "no fall/rise"
    check_rise: int | None
    use_watcher: bool        # fast path: mt-healthwatch feeding a track_file (reacts within WATCH_INTERVAL_S)
    watch_interval_s: str
    watch_fall: int
    watch_rise: int
    retry_mode: str          # mt-failover: backoff (bounded exponential, jitter) | fixed (tutorial)
    retry_fixed_s: int
    retry_max_attempts: int
    backoff_base_s: str
    backoff_max_s: str
    reconcile_interval_s: str

    @property
    def master_down_s(self) -> float:
        """Time a BACKUP waits without adverts before taking over (3 x advert + skew at prio 100)."""
        adv = float(self.advert_int)
        return 3 * adv + (256 - 100) * adv / 256


PROFILES = {
    "fast": Profile(
        name="fast", vrrp_version=3, advert_int="0.2", check_interval=1, check_timeout=2,
        check_fall=2, check_rise=2, use_watcher=True, watch_interval_s="0.2", watch_fall=2, watch_rise=3,
        retry_mode="backoff", retry_fixed_s=3, retry_max_attempts=10, backoff_base_s="0.1",
        backoff_max_s="5", reconcile_interval_s="2",
    ),
    # The original DigitalOcean tutorial (keepalived + assign-ip): check every 2 s, no fall/rise,
    # 1 s VRRPv2 adverts, and the assign retried every 3 s. Kept to measure against, side by side.
    "tutorial": Profile(
        name="tutorial", vrrp_version=2, advert_int="1", check_interval=2, check_timeout=2,
        check_fall=None, check_rise=None, use_watcher=False, watch_interval_s="0.2", watch_fall=2,
        watch_rise=3, retry_mode="fixed", retry_fixed_s=3, retry_max_attempts=10, backoff_base_s="0.1",
        backoff_max_s="5", reconcile_interval_s="5",
    ),
}
