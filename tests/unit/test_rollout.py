"""scripts/rollout.py: the tool's decisions, against a simulated pair behind a fake transport.

`Pair` plays both nodes (their app, their HAProxy's `local` and `peer` servers, keepalived with
nopreempt tracking "this node can serve", the maintenance flag, the rollout lock), the
DigitalOcean API (who holds the reserved IP) and the edge (who answers a client), all on a fake
clock: a drained MASTER goes FAULT, the healthy BACKUP becomes MASTER 0.3 s later and the API
moves the reserved IP `action_s` after that; a deploy restarts the app, which listens and is
healthy `health_delay` seconds later (a `bad...` version listens but answers 503 forever). The
transport answers `mt-deploy` commands with the node script's JSON and exit codes. `history`
records, at every step, which node the edge sends clients to, which app that node's HAProxy picks
(the first server in rotation whose app listens: HAProxy's TCP check) and whether it answered 2xx,
which is how the tests see a client's outage and a bad version served.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "scripts" / "rollout.py"
spec = importlib.util.spec_from_file_location("rollout_tool", TOOL)
rollout = importlib.util.module_from_spec(spec)
sys.modules["rollout_tool"] = rollout
spec.loader.exec_module(rollout)

IDS = {"primary": 410000001, "standby": 410000002}
OWNER = "test-owner"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class Node:
    def __init__(self, name: str, state: str) -> None:
        self.name, self.state, self.since = name, state, 0.0
        self.configured = self.running = "v1"
        self.ready_at = 0.0
        self.flag = False
        self.lock: str | None = None
        self.keepalived = True
        self.broken = False                 # the app is down whatever the version
        self.fails: set[str] = set()        # versions that never become healthy on this node
        self.deploy_fails: dict[str, int] = {}
        self.servers = {"local": "UP", "peer": "UP"}  # this node's HAProxy: admin state of each app server


class Pair:
    """The simulated pair, API and edge. `active` starts as MASTER holding the reserved IP."""

    def __init__(self, active: str = "primary", health_delay: float = 2.0, action_s: float = 0.5,
                 serve: str = "active-standby") -> None:
        self.clock = Clock()
        other = "standby" if active == "primary" else "primary"
        self.nodes = {active: Node(active, "MASTER"), other: Node(other, "BACKUP")}
        self.holder: str | None = active
        self.ids = dict(IDS)    # a reimaged node gets a new droplet ID
        self.health_delay = health_delay
        self.action_s = action_s
        self.serve = serve           # both: each HAProxy alternates between the apps in rotation
        self.transitions: list[tuple[float, str, str]] = []
        self.api_stuck = False
        self.api_errors = 0
        self.unreachable: set[str] = set()
        self.master_lost_at: float | None = None
        self.pending: tuple[str, float] | None = None
        self.calls: list[tuple[float, str, tuple[str, ...]]] = []
        self.history: list[tuple[float, str | None, bool, str | None, str | None]] = []
        self.on_call = None       # hook(node, args) after a command is applied
        self.flap: tuple[str, float, float] | None = None  # node unhealthy during [start, end)
        self._lock = threading.RLock()

    # -- the simulation ------------------------------------------------------------------------
    def app_ok(self, n: Node) -> bool:
        t = self.clock()
        if self.flap and self.flap[0] == n.name and self.flap[1] <= t < self.flap[2]:
            return False
        return (not n.broken and n.running is not None and not n.running.startswith("bad")
                and n.running not in n.fails and t >= n.ready_at)

    def listens(self, n: Node) -> bool:
        """HAProxy's TCP check passes: the app process is up (healthy or not)."""
        return not n.broken and n.running is not None and self.clock() >= n.ready_at

    def app_of(self, n: Node, server: str) -> Node:
        return n if server == "local" else next(m for m in self.nodes.values() if m is not n)

    def picks(self, n: Node) -> Node | None:
        """The app `n`'s HAProxy sends a request to (active-standby: local first; both: alternating),
        None: no server."""
        apps = [self.app_of(n, s) for s in ("local", "peer") if n.servers[s] == "UP" and self.listens(self.app_of(n, s))]
        if not apps:
            return None
        return apps[len(self.history) % len(apps)] if self.serve == "both" else apps[0]

    def set_state(self, n: Node, state: str) -> None:
        if n.state != state:
            self.transitions.append((self.clock(), n.name, state))
            n.state, n.since = state, self.clock()

    def advance(self) -> None:
        with self._lock:
            t = self.clock()
            for n in self.nodes.values():
                healthy = self.picks(n) is not None and not n.flag and n.keepalived  # HAProxy's monitor
                if n.state in ("MASTER", "BACKUP") and not healthy:
                    if n.state == "MASTER":
                        self.master_lost_at = t
                    self.set_state(n, "FAULT")
                elif n.state == "FAULT" and healthy:
                    self.set_state(n, "BACKUP")  # nopreempt: back as BACKUP, never grabbing the IP
            if not any(n.state == "MASTER" for n in self.nodes.values()):
                ready = [n for n in self.nodes.values() if n.state == "BACKUP"]
                if ready and t >= (self.master_lost_at or 0.0) + 0.3:
                    self.set_state(ready[0], "MASTER")
                    self.pending = (ready[0].name, t + self.action_s)
            if self.pending and t >= self.pending[1] and not self.api_stuck:
                self.holder, self.pending = self.pending[0], None
            app = self.picks(self.nodes[self.holder]) if self.holder else None
            serving = app is not None and self.app_ok(app)
            self.history.append((t, self.holder, serving, app and app.name, app and app.running))

    def step(self, seconds: float = 0.05) -> None:
        self.clock.t += seconds
        self.advance()

    # -- what a node answers ----------------------------------------------------------------------
    def status_doc(self, n: Node) -> dict:
        ok = self.app_ok(n)
        track = "3" if n.flag else ("0" if ok else "1")
        lock = {"owner": n.lock, "since": 0, "ttl_s": 3600, "age_s": 1.0} if n.lock else None
        return {"node": n.name, "vrrp_state": n.state, "vrrp_since": n.since, "keepalived_running": n.keepalived,
                "configured_version": n.configured, "running_version": n.running,
                "http_status": 200 if ok else 503, "app_health": 0 if ok else 1, "healthy": ok and not n.flag,
                "maintenance": n.flag, "track": track, "lock": lock, "time": self.clock(),
                "haproxy": {k: {"status": v if v != "UP" or self.listens(self.app_of(n, k)) else "DOWN", "sessions": 0}
                            for k, v in n.servers.items()}}

    def run(self, node: str, args, timeout: float):
        with self._lock:
            self.step()
            self.calls.append((self.clock(), node, tuple(args)))
            if node in self.unreachable:
                raise rollout.TransportError(f"ssh to {node} failed: Connection refused")
            n = self.nodes[node]
            cmd = args[0]
            out: dict = {}
            code = 0
            if cmd == "status":
                out = self.status_doc(n)
            elif cmd == "deploy":
                version = args[1]
                if version in n.deploy_fails:
                    return rollout.RunResult(n.deploy_fails[version], "", "docker compose pull failed: not found")
                n.configured = n.running = version
                n.ready_at = self.clock() + self.health_delay
                out = {"node": node, "deployed": version}
            elif cmd == "drain":
                n.flag = True
            elif cmd == "undrain":
                n.flag = False
            elif cmd == "server":   # mt-deploy server SERVER STATE --wait S
                server, state = args[1], args[2]
                app = self.app_of(n, server)
                others = [k for k in n.servers if k != server and n.servers[k] == "UP"
                          and self.listens(self.app_of(n, k))]
                if state == "maint" and n.servers[server] == "UP" and self.listens(app) and not others:
                    return rollout.RunResult(7, "", "mt-deploy: not taking app/x out: it is the only app server UP")
                if state == "maint":
                    n.servers[server] = "MAINT"
                elif not self.listens(app):
                    n.servers[server] = "UP"
                    return rollout.RunResult(7, "", "mt-deploy: app/x enabled but HAProxy's checks did not see it UP")
                else:
                    n.servers[server] = "UP"
                out = {"node": node, "server": server, "state": n.servers[server], "sessions_left": 0}
            elif cmd == "lock":
                if n.lock and n.lock != args[1]:
                    code, out = 3, {"node": node, "locked": False,
                                    "holder": {"owner": n.lock, "since": 0, "ttl_s": 3600, "age_s": 42.0}}
                else:
                    n.lock = args[1]
            elif cmd == "unlock":
                if n.lock and n.lock != args[1]:
                    code = 3
                else:
                    n.lock = None
            self.advance()
        if self.on_call:
            self.on_call(node, args)
        return rollout.RunResult(code, json.dumps(out) + "\n", "")

    # -- the API and a client ------------------------------------------------------------------------
    def api_holder(self) -> int | None:
        with self._lock:
            self.step(0.01)
            if self.api_errors:
                self.api_errors -= 1
                raise rollout.ApiError("GET /v2/reserved_ips/203.0.113.10: HTTP 500")
            return self.ids[self.holder] if self.holder else None

    def probe(self):
        with self._lock:
            self.step(0.01)
            if self.holder is None:
                return rollout.Answer(None, None, None, "timeout")
            n = self.nodes[self.holder]
            return rollout.Answer(200 if self.app_ok(n) else 503, n.name, n.running)

    # -- helpers for assertions ------------------------------------------------------------------------
    def commands(self, node: str | None = None, cmd: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
        return [(nd, a) for _, nd, a in self.calls if (node is None or nd == node) and (cmd is None or a[0] == cmd)]

    def touched(self, node: str) -> set[str]:
        """Commands that change a node (not status, lock, unlock)."""
        return {a[0] for nd, a in self.commands(node) if a[0] in ("deploy", "drain", "undrain", "server")}

    def outage(self) -> list[tuple]:
        return [h for h in self.history if not h[2]]

    def served(self) -> set[tuple[str | None, str | None]]:
        """(app's node, version) of every answer a client got."""
        return {(h[3], h[4]) for h in self.history if h[2]}

    def out_of_rotation(self) -> dict[str, dict[str, str]]:
        return {n.name: {k: v for k, v in n.servers.items() if v != "UP"} for n in self.nodes.values()
                if any(v != "UP" for v in n.servers.values())}


class FakeApi:
    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def holder(self):
        return self.pair.api_holder()


class FakeProbe:
    url = "http://203.0.113.10/latest"

    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def get(self):
        return self.pair.probe()


def make_tool(pair: Pair, **opts) -> tuple[object, list[str]]:
    stack = rollout.Stack("203.0.113.10", "http://203.0.113.10/", dict(IDS),
                          {"primary": "192.0.2.11", "standby": "192.0.2.12"})
    lines: list[str] = []
    options = rollout.Options(**{"health_timeout": 30.0, "move_timeout": 10.0, "poll_interval": 0.5,
                                 "settle": 2.0, **opts})
    tool = rollout.Rollout(stack, pair, FakeApi(pair), FakeProbe(pair), options, lines.append, OWNER,
                           clock=pair.clock, sleep=pair.step)
    return tool, lines


def do_rollout(pair: Pair, version: str = "v2", **opts) -> tuple[int, list[str], object]:
    tool, lines = make_tool(pair, **opts)
    code = tool.execute("rollout", lambda: tool.rollout(version))
    return code, lines, tool


def do_switchover(pair: Pair, **opts) -> tuple[int, list[str], object]:
    tool, lines = make_tool(pair, **opts)
    code = tool.execute("switchover", tool.switchover)
    return code, lines, tool


def assert_clean(pair: Pair) -> None:
    """Locks released, nothing left drained, every app back in rotation in both HAProxies."""
    assert {n.name: n.lock for n in pair.nodes.values()} == {"primary": None, "standby": None}
    assert not any(n.flag for n in pair.nodes.values())
    assert pair.out_of_rotation() == {}


# ------------------------------------------------------------------------------------------------
# The happy path: one app at a time out of rotation, standby's first; no IP move, no outage.


def server_calls(pair: Pair) -> list[tuple[str, str, str]]:
    """(HAProxy's node, server, state) of every `mt-deploy server` call, in order."""
    return [(nd, a[1], a[2]) for nd, a in pair.commands(cmd="server")]


@pytest.mark.parametrize("active,standby", [("primary", "standby"), ("standby", "primary")])
@pytest.mark.parametrize("serve", ["active-standby", "both"])
def test_rollout_updates_each_app_out_of_rotation_standby_first_and_never_moves_the_ip(active, standby, serve):
    pair = Pair(active=active, serve=serve)
    code, lines, tool = do_rollout(pair)
    assert code == rollout.EXIT_OK, lines
    assert pair.commands(cmd="deploy") == [(standby, ("deploy", "v2")), (active, ("deploy", "v2"))]
    # Each app out of both HAProxies (the active's first: it carries the traffic) before its deploy,
    # and back in after; the maintenance flag is never used.
    assert server_calls(pair) == [
        (active, "peer", "maint"), (standby, "local", "maint"), (standby, "local", "ready"), (active, "peer", "ready"),
        (active, "local", "maint"), (standby, "peer", "maint"), (standby, "peer", "ready"), (active, "local", "ready")]
    assert pair.commands(cmd="drain") == []
    assert pair.holder == active and {h[1] for h in pair.history} == {active}   # the reserved IP never moved
    assert pair.transitions == []                                             # keepalived never changed state
    assert {n.configured for n in pair.nodes.values()} == {"v2"}
    assert pair.outage() == []                         # a client was always answered by a healthy app
    assert pair.served() >= {(standby, "v2"), (active, "v2")}
    assert_clean(pair)
    assert set(tool.report.deploy_health_s) == {active, standby}
    assert tool.report.active_before == tool.report.active_after == active


def test_the_active_app_is_taken_out_only_after_the_standby_app_is_healthy_and_back_in_rotation():
    pair = Pair(health_delay=5.0)
    code, lines, _ = do_rollout(pair)
    assert code == 0, lines
    t_out = next(t for t, nd, a in pair.calls if a[:3] == ("server", "local", "maint") and nd == "primary")
    t_in = next(t for t, nd, a in pair.calls if a[:3] == ("server", "peer", "ready") and nd == "primary")
    t_deploy = next(t for t, nd, a in pair.calls if a == ("deploy", "v2") and nd == "standby")
    assert t_out >= t_deploy + 5.0 + 2.0             # healthy after 5 s, then stable for the 2 s settle
    assert t_out > t_in


def test_a_standby_that_flaps_right_after_becoming_healthy_is_not_put_back_until_stable():
    pair = Pair(health_delay=2.0)
    deployed = []

    def hook(node, args):
        if args[0] == "deploy" and node == "standby" and not deployed:
            deployed.append(pair.clock())
            start = pair.clock() + 2.0 + 1.0            # healthy for 1 s, then down for 0.7 s
            pair.flap = ("standby", start, start + 0.7)

    pair.on_call = hook
    code, lines, _ = do_rollout(pair)
    assert code == 0, lines
    t_in = next(t for t, nd, a in pair.calls if a[:3] == ("server", "peer", "ready") and nd == "primary")
    assert t_in >= pair.flap[2] + 2.0                   # only after 2 s of uninterrupted health past the flap
    assert pair.outage() == []


def test_the_same_version_everywhere_is_a_no_op():
    pair = Pair()
    code, lines, _ = do_rollout(pair, "v1")
    assert code == 0
    assert pair.touched("primary") == pair.touched("standby") == set()
    assert any("nothing to do" in ln for ln in lines)
    assert_clean(pair)


def test_an_active_already_on_the_version_is_not_touched_and_only_the_standby_is_updated():
    pair = Pair()
    pair.nodes["primary"].configured = pair.nodes["primary"].running = "v2"
    code, lines, _ = do_rollout(pair)
    assert code == 0, lines
    assert pair.commands(cmd="deploy") == [("standby", ("deploy", "v2"))]
    assert ("primary", "local", "maint") not in server_calls(pair) and pair.holder == "primary"
    assert_clean(pair)


def test_refuses_while_an_app_is_still_out_of_rotation_from_an_earlier_run_and_says_how_to_put_it_back():
    pair = Pair()
    pair.nodes["primary"].servers["peer"] = "MAINT"
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED
    assert any("primary's HAProxy has an app out of rotation (peer MAINT" in ln
               and "mt-deploy server peer ready` on primary" in ln for ln in lines)
    assert pair.touched("primary") == pair.touched("standby") == set()


# ------------------------------------------------------------------------------------------------
# Refusals: nothing is touched, locks are released, the message says why.


def test_refuses_when_the_api_and_keepalived_disagree_about_the_active_node():
    pair = Pair()
    pair.holder = "standby"          # API says standby, keepalived says primary is MASTER
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED
    assert pair.touched("primary") == pair.touched("standby") == set()
    assert any("disagrees" in ln and "Nothing was changed" in ln for ln in lines)
    assert_clean(pair)


def test_refuses_when_the_reserved_ip_is_unassigned():
    pair = Pair()
    pair.holder = None
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED
    assert any("unassigned" in ln for ln in lines)
    assert pair.touched("primary") == pair.touched("standby") == set()


@pytest.mark.parametrize("problem", ["app down", "drained", "keepalived stopped"])
def test_refuses_when_the_standby_could_not_take_over(problem):
    pair = Pair()
    standby = pair.nodes["standby"]
    if problem == "app down":
        standby.broken = True
    elif problem == "drained":
        standby.flag = True
    else:
        standby.keepalived = False
    pair.advance()
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED, lines
    assert pair.touched("primary") == pair.touched("standby") == set()
    assert any("cannot take over" in ln for ln in lines)


def test_refuses_when_a_node_cannot_be_reached():
    pair = Pair()
    pair.unreachable.add("standby")
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED
    assert any("cannot reach standby" in ln for ln in lines)
    assert pair.touched("primary") == set()
    assert pair.nodes["primary"].lock is None          # the first lock was given back


def test_refuses_while_another_rollout_holds_a_lock_and_gives_back_the_lock_it_took():
    pair = Pair()
    pair.nodes["standby"].lock = "ci-run-41"
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED
    assert any("locked by ci-run-41" in ln for ln in lines)
    assert pair.nodes["primary"].lock is None and pair.nodes["standby"].lock == "ci-run-41"
    assert pair.touched("primary") == pair.touched("standby") == set()


def test_locks_are_taken_in_a_fixed_order_whichever_node_is_active():
    for active in ("primary", "standby"):
        pair = Pair(active=active)
        do_rollout(pair)
        assert [nd for nd, _ in pair.commands(cmd="lock")] == ["primary", "standby"]


def test_api_hiccups_during_the_survey_are_retried():
    pair = Pair()
    pair.api_errors = 2
    code, lines, _ = do_rollout(pair)
    assert code == 0, lines


# ------------------------------------------------------------------------------------------------
# Failures on the standby: the active is never touched, a bad version is never served.


@pytest.mark.parametrize("serve", ["active-standby", "both"])
def test_a_version_that_never_becomes_healthy_is_rolled_back_out_of_rotation_and_never_served(serve):
    pair = Pair(serve=serve)
    start = pair.clock()
    code, lines, _ = do_rollout(pair, "bad-2", health_timeout=20.0)
    assert code == rollout.EXIT_FAILED
    assert pair.commands("primary", "deploy") == []                 # the active's app was never touched
    assert ("primary", "local", "maint") not in server_calls(pair)
    assert pair.commands("standby", "deploy") == [("standby", ("deploy", "bad-2")), ("standby", ("deploy", "v1"))]
    assert {h[1] for h in pair.history} == {"primary"} and pair.outage() == []
    assert not any(version == "bad-2" for _, version in pair.served())  # it listened, but HAProxy never sent to it
    if serve == "both":
        assert ("standby", "v1") in pair.served()                   # the standby's app did serve before and after
    assert pair.transitions == []
    assert pair.nodes["standby"].configured == "v1" and pair.nodes["standby"].state == "BACKUP"
    assert pair.clock() - start < 20.0 + 2.0 + 2.0 + 5.0          # bounded: health timeout + rollback
    assert any("never became healthy on the standby" in ln and "was not touched" in ln for ln in lines)
    assert any(ln.startswith("traffic now: reserved IP on primary") for ln in lines)
    assert_clean(pair)                                              # rolled back, so back in rotation


def test_a_failed_deploy_on_the_standby_is_rolled_back_and_the_active_is_not_touched():
    pair = Pair()
    pair.nodes["standby"].deploy_fails["v2"] = 5
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_FAILED
    assert pair.commands("primary", "deploy") == []
    assert pair.nodes["standby"].configured == "v1"
    assert any("exited 5" in ln for ln in lines)
    assert_clean(pair)


def test_a_standby_that_cannot_be_rolled_back_stays_out_of_rotation_and_is_degraded():
    pair = Pair()
    pair.nodes["standby"].deploy_fails["v1"] = 5
    code, lines, _ = do_rollout(pair, "bad-2", health_timeout=10.0)
    assert code == rollout.EXIT_DEGRADED
    assert pair.commands("primary", "deploy") == [] and pair.holder == "primary" and pair.outage() == []
    assert pair.out_of_rotation() == {"primary": {"peer": "MAINT"}, "standby": {"local": "MAINT"}}
    assert any("could NOT be rolled back" in ln and "stays out of rotation" in ln for ln in lines)
    assert all(n.lock is None for n in pair.nodes.values())


# ------------------------------------------------------------------------------------------------
# Failures on the active node's app: the standby's app serves meanwhile, the IP stays.


def test_a_former_active_that_fails_the_new_version_is_rolled_back_and_put_back():
    pair = Pair()
    pair.nodes["primary"].fails.add("v2")
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_FAILED, lines
    assert pair.holder == "primary" and pair.nodes["standby"].running == "v2"
    assert pair.nodes["primary"].configured == "v1" and pair.nodes["primary"].state == "MASTER"
    assert pair.outage() == [] and pair.transitions == []
    assert not any(nd == "primary" and version == "v2" for nd, version in pair.served())
    assert any("mixed" in ln for ln in lines)
    assert_clean(pair)


def test_a_former_active_that_cannot_be_rolled_back_stays_out_of_rotation_and_is_degraded():
    pair = Pair()
    pair.nodes["primary"].fails.add("v2")
    pair.nodes["primary"].deploy_fails["v1"] = 5
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_DEGRADED
    # The standby's app serves every request through the active's HAProxy; the IP never moved.
    assert pair.out_of_rotation() == {"primary": {"local": "MAINT"}, "standby": {"peer": "MAINT"}}
    assert pair.holder == "primary" and pair.outage() == [] and pair.transitions == []
    assert all(n.lock is None for n in pair.nodes.values())
    assert any("stays out of rotation" in ln for ln in lines)


def test_an_app_haproxy_will_not_take_out_stops_the_rollout_before_its_deploy():
    pair = Pair()
    real_run = pair.run

    def refusing(node, args, timeout):
        if node == "primary" and tuple(args[:3]) == ("server", "local", "maint"):
            pair.calls.append((pair.clock(), node, tuple(args)))
            return rollout.RunResult(7, "", "mt-deploy: not taking app/local out: it is the only app server UP")
        return real_run(node, args, timeout)

    pair.run = refusing
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_FAILED
    assert pair.commands("primary", "deploy") == []
    assert any("could not be taken out of rotation" in ln and "only app server UP" in ln for ln in lines)
    assert_clean(pair)


def test_sigterm_while_the_active_app_is_taken_out_puts_it_back_releases_locks_and_says_where_traffic_is():
    pair = Pair()

    def hook(node, args):
        if node == "primary" and tuple(args[:3]) == ("server", "local", "maint"):
            os.kill(os.getpid(), signal.SIGTERM)

    pair.on_call = hook
    before = signal.getsignal(signal.SIGTERM)
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) is before              # handlers restored
    assert pair.commands("primary", "deploy") == []
    assert any(ln.startswith("traffic now:") for ln in lines)
    assert_clean(pair)                                              # healthy: back in rotation


def test_sigint_while_the_active_app_is_unhealthy_leaves_it_out_of_rotation_and_says_how_to_put_it_back():
    pair = Pair()

    def hook(node, args):
        if args[0] == "deploy" and node == "primary":
            os.kill(os.getpid(), signal.SIGINT)

    pair.on_call = hook
    code, lines, _ = do_rollout(pair)
    assert code == rollout.EXIT_INTERRUPTED
    assert pair.out_of_rotation() == {"primary": {"local": "MAINT"}, "standby": {"peer": "MAINT"}}
    assert pair.holder == "primary" and pair.outage() == []
    assert any("stays out of rotation" in ln and "server local ready` on primary" in ln for ln in lines)
    assert all(n.lock is None for n in pair.nodes.values())


# ------------------------------------------------------------------------------------------------
# Switchover: the one planned IP move.


def test_switchover_moves_the_reserved_ip_and_the_old_holder_forwards_to_the_new_app_until_the_move_completes():
    pair = Pair(action_s=5.0)                                      # the API's realistic action time
    code, lines, _ = do_switchover(pair)
    assert code == 0, lines
    assert pair.holder == "standby" and pair.nodes["primary"].state == "BACKUP"
    assert pair.commands(cmd="deploy") == [] and pair.outage() == []
    t_drain = next(t for t, nd, a in pair.calls if a[0] == "drain")
    t_local_out = next(t for t, nd, a in pair.calls if a[:3] == ("server", "local", "maint"))
    assert t_local_out < t_drain                                   # forwarding before keepalived lets go
    while_moving = [h for h in pair.history if h[0] > t_drain and h[1] == "primary"]
    assert len(while_moving) > 10 and {h[3] for h in while_moving} == {"standby"}  # served by the new app
    assert_clean(pair)                                             # rejoined: its app back in rotation


def test_a_reserved_ip_that_does_not_move_in_time_undrains_the_active_and_puts_its_app_back():
    pair = Pair()
    pair.api_stuck = True
    code, lines, _ = do_switchover(pair, move_timeout=8.0)
    # keepalived moved (standby MASTER) but the API did not: they disagree, so an operator must look.
    assert code == rollout.EXIT_DEGRADED
    assert any("treat this as degraded" in ln for ln in lines)
    assert pair.nodes["primary"].flag is False                     # undrained: it keeps serving
    assert pair.holder == "primary" and pair.outage() == []
    assert any("did not move to standby within 8 s" in ln for ln in lines)
    assert_clean(pair)


def test_sigterm_during_the_move_undrains_the_healthy_active_and_puts_its_app_back():
    pair = Pair()

    def hook(node, args):
        if args[0] == "drain":
            os.kill(os.getpid(), signal.SIGTERM)

    pair.on_call = hook
    code, lines, _ = do_switchover(pair)
    assert code == rollout.EXIT_INTERRUPTED
    assert pair.commands("primary", "undrain")
    assert any(ln.startswith("traffic now:") for ln in lines)
    assert_clean(pair)


def test_switchover_refuses_an_unhealthy_standby():
    pair = Pair()
    pair.nodes["standby"].broken = True
    pair.advance()
    code, _, _ = do_switchover(pair)
    assert code == rollout.EXIT_REFUSED
    assert pair.touched("primary") == set() and pair.holder == "primary"


# ------------------------------------------------------------------------------------------------
# The real transport and the command line.


def test_ssh_transport_is_non_interactive_and_runs_the_node_script_under_the_remote_root():
    t = rollout.SshTransport({"primary": "192.0.2.11", "standby": "192.0.2.12"}, identity="/keys/deploy",
                             known_hosts="/keys/known_hosts", strict="yes", options=["BindAddress=192.0.2.200"],
                             remote_root="/run/lab/{node}")
    argv = t.argv("standby", ["deploy", "v2; rm -rf /"])
    text = " ".join(argv)
    for opt in ("BatchMode=yes", "ConnectTimeout=10", "StrictHostKeyChecking=yes", "UserKnownHostsFile=/keys/known_hosts",
                "BindAddress=192.0.2.200", "IdentitiesOnly=yes"):
        assert opt in argv
    assert argv[argv.index("-i") + 1] == "/keys/deploy"
    assert argv[-3:-1] == ["192.0.2.12", "--"] and argv[argv.index("-l") + 1] == "deploy"
    assert argv[-1] == "sudo -n /run/lab/standby/usr/libexec/minitwit-ha/mt-deploy deploy 'v2; rm -rf /'"
    assert "ControlPath" not in text                       # no multiplexing before __enter__
    droplet = rollout.SshTransport({"primary": "192.0.2.11"}).argv("primary", ["status"])
    assert droplet[-1] == "sudo -n /usr/libexec/minitwit-ha/mt-deploy status"


def run_cli(tmp_path, *args, token="dop_v1_" + "c" * 64, outputs=None):
    out = tmp_path / "outputs.json"
    out.write_text(json.dumps(outputs if outputs is not None else {
        "reserved_ip": "203.0.113.10", "app_url": "http://203.0.113.10/", "vpc_id": "x",
        "nodes": {"primary": {"droplet_id": 1, "public_ipv4": "127.0.0.1", "private_ipv4": "198.51.100.11"},
                  "standby": {"droplet_id": 2, "public_ipv4": "127.0.0.1", "private_ipv4": "198.51.100.12"}}}))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    if token:
        env["DIGITALOCEAN_TOKEN"] = token
    return subprocess.run([sys.executable, str(TOOL), *args, "--outputs", str(out)], env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_without_a_token_stops_before_touching_anything(tmp_path):
    proc = run_cli(tmp_path, "rollout", "--version", "v2", token=None)
    assert proc.returncode == 2 and "DIGITALOCEAN_TOKEN is not set" in proc.stderr


@pytest.mark.parametrize("version", ["v2 extra", "-v2", "../../etc", "x" * 129])
def test_cli_rejects_a_version_that_is_not_a_docker_tag(tmp_path, version):
    proc = run_cli(tmp_path, "rollout", f"--version={version}")
    assert proc.returncode == 2 and "not a docker tag" in proc.stderr


def test_cli_rejects_outputs_without_nodes(tmp_path):
    proc = run_cli(tmp_path, "switchover", outputs={"reserved_ip": "203.0.113.10", "app_url": "http://x/"})
    assert proc.returncode == 2 and "no `nodes`" in proc.stderr


def test_cli_unreachable_nodes_are_refused_with_a_report_and_the_token_never_shows(tmp_path):
    token = "dop_v1_" + "d" * 64
    report = tmp_path / "report.json"
    proc = run_cli(tmp_path, "rollout", "--version", "v2", "--ssh-option", "Port=1", "--ssh-option",
                   f"UserKnownHostsFile={tmp_path}/kh", "--report", str(report), token=token)
    assert proc.returncode == rollout.EXIT_REFUSED, proc.stderr
    assert "cannot reach primary to take its lock" in proc.stderr
    assert token not in proc.stderr + proc.stdout + report.read_text()
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "refused" and doc["exit_code"] == 3


def test_cli_help_documents_every_exit_code():
    proc = subprocess.run([sys.executable, str(TOOL), "rollout", "--help"], capture_output=True, text=True)
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130 "):
        assert f"\n  {code}" in proc.stdout
    assert "DIGITALOCEAN_TOKEN" in proc.stdout


# ------------------------------------------------------------------------------------------------
# resize / reimage: one node per `pulumi up`, standby first.


class FakePulumi(rollout.PulumiCli):
    """The Pulumi CLI against the simulated pair: `config set` keeps the stack's config, `up --target`
    of one droplet reboots (resize) or replaces (reimage) that node, taking `up_seconds` of sim time."""

    def __init__(self, pair: Pair, up_seconds: float = 60.0, fail_up_on: str | None = None) -> None:
        super().__init__(["pulumi"], "prod", lambda _m: None)
        self.pair, self.up_seconds, self.fail_up_on = pair, up_seconds, fail_up_on
        self.config: dict[str, str] = {}
        self.calls: list[tuple[str, ...]] = []
        self.ups: list[tuple[str, dict, str | None]] = []   # (node, nodeOverrides, holder) at each up

    def run(self, *args: str) -> str:
        self.calls.append(args)
        if args[:2] == ("config", "set"):
            self.config[args[2]] = args[3]
        elif args[0] == "up":
            target = args[args.index("--target") + 1]
            node = target.rsplit("-", 1)[1]
            assert target == self.droplet_urn(node) and "--target-dependents" in args
            self.ups.append((node, json.loads(self.config.get("nodeOverrides") or "{}"), self.pair.holder))
            if node == self.fail_up_on:
                raise rollout.PulumiFailed("`pulumi up` exited 255: error: resizing droplet: 422 unprocessable")
            n = self.pair.nodes[node]
            with self.pair._lock:
                n.ready_at = self.pair.clock() + self.up_seconds + self.pair.health_delay  # down while it reboots
                if "dropletImage" in json.loads(self.config.get("nodeOverrides") or "{}").get(node, {}):
                    self.pair.ids[node] += 1000   # a new droplet: new ID, no flag, no lock
                    n.flag, n.lock = False, None
            for _ in range(int(self.up_seconds / 0.5)):
                self.pair.step(0.5)
        elif args[:2] == ("stack", "output"):
            nodes = {n: {"droplet_id": self.pair.ids[n], "public_ipv4": f"192.0.2.{self.pair.ids[n] % 250}",
                         "private_ipv4": "10.110.16.2"} for n in self.pair.nodes}
            return json.dumps({"reserved_ip": "203.0.113.10", "app_url": "http://203.0.113.10/", "nodes": nodes})
        return ""


def do_rebuild(pair: Pair, command: str, value: str, **kw) -> tuple[int, list[str], FakePulumi, object]:
    tool, lines = make_tool(pair, health_timeout=120.0)
    cli = FakePulumi(pair, **kw)
    rebuild = rollout.NodeRebuild(tool, cli)
    code = tool.execute(command, lambda: rebuild.run(command, value))
    return code, lines, cli, tool


@pytest.mark.parametrize("command,key,value", [("resize", "dropletSize", "s-2vcpu-4gb"),
                                               ("reimage", "dropletImage", "ubuntu-24-04-x64")])
@pytest.mark.parametrize("active,standby", [("primary", "standby"), ("standby", "primary")])
def test_resize_and_reimage_walk_the_standby_first_and_never_touch_both_nodes_in_one_up(
        command, key, value, active, standby):
    pair = Pair(active=active)
    code, lines, cli, tool = do_rebuild(pair, command, value)
    assert code == rollout.EXIT_OK, lines
    # One node per `pulumi up`, the standby first, and never the node holding the reserved IP.
    assert cli.ups == [(standby, {standby: {key: value}}, active), (active, {active: {key: value}}, standby)]
    assert pair.commands(cmd="drain") == [(active, ("drain", OWNER))]
    # Afterwards the stack-wide value is set and no override is left: a plain `up` changes nothing.
    assert cli.config == {"nodeOverrides": "", key: value}
    assert pair.holder == standby and pair.outage() == []
    assert pair.nodes[active].state == "BACKUP" and pair.nodes[standby].state == "MASTER"
    assert_clean(pair)
    if command == "reimage":  # the tool follows the new droplets' IDs (the API names them)
        assert tool.stack.droplets == {n: IDS[n] + 1000 for n in IDS}


def test_a_failed_up_on_the_standby_leaves_the_active_node_untouched():
    pair = Pair(active="primary")
    code, lines, cli, _ = do_rebuild(pair, "resize", "s-2vcpu-4gb", fail_up_on="standby")
    assert code == rollout.EXIT_FAILED, lines
    assert [u[0] for u in cli.ups] == ["standby"]
    assert pair.holder == "primary" and pair.commands(cmd="drain") == []
    assert "The active node (primary) was not touched" in "\n".join(lines)
    assert_clean(pair)


def test_a_failed_up_on_the_former_active_is_degraded_and_says_so():
    pair = Pair(active="primary")
    code, lines, cli, _ = do_rebuild(pair, "resize", "s-2vcpu-4gb", fail_up_on="primary")
    assert code == rollout.EXIT_DEGRADED, lines
    assert [u[0] for u in cli.ups] == ["standby", "primary"]
    assert pair.holder == "standby" and pair.outage() == []
    assert "There is no working standby" in "\n".join(lines)


def test_resize_needs_a_stack_and_a_slug(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", "dop_v1_" + "0" * 64)
    outputs = tmp_path / "out.json"
    outputs.write_text("{}")
    assert rollout.main(["resize", "--size", "s-2vcpu-4gb", "--outputs", str(outputs)]) == rollout.EXIT_USAGE
    assert rollout.main(["reimage", "--image", "Bad Image!", "--stack", "prod"]) == rollout.EXIT_USAGE
