"""scripts/rollout.py with app workers (appWorkers): workers first, --batch at a time, never fewer than
half of the app servers healthy, a bad version stopped before the pair.

The simulated pair of tests/unit/test_rollout.py, plus workers: app-only nodes (no keepalived, no
HAProxy of their own) that are servers `worker-N` in both pair nodes' HAProxy. With workers, a
node's HAProxy spreads requests over every app server in rotation whose app listens (leastconn,
played as a rotation), so `history` shows a client answered by a worker, and by a bad version if
one were ever put in rotation.
"""

from __future__ import annotations

import json

import pytest

from tests.unit.test_rollout import IDS, OWNER, Node, Pair, make_tool, rollout, server_calls

WORKER_IDS = {"worker-1": 410000031, "worker-2": 410000032, "worker-3": 410000033, "worker-4": 410000034}


class WorkerPair(Pair):
    def __init__(self, workers: int = 2, **kw) -> None:
        super().__init__(**kw)
        self.workers = {f"worker-{i + 1}": Node(f"worker-{i + 1}", "UNKNOWN") for i in range(workers)}
        for n in self.nodes.values():
            n.servers.update({w: "UP" for w in self.workers})

    def app_of(self, n: Node, server: str) -> Node:
        return self.workers[server] if server in self.workers else super().app_of(n, server)

    def picks(self, n: Node) -> Node | None:
        if not self.workers:
            return super().picks(n)
        apps = [self.app_of(n, s) for s in n.servers if n.servers[s] == "UP" and self.listens(self.app_of(n, s))]
        return apps[len(self.history) % len(apps)] if apps else None

    def run(self, node: str, args, timeout: float):
        if node not in self.workers:
            return super().run(node, args, timeout)
        with self._lock:
            self.step()
            self.calls.append((self.clock(), node, tuple(args)))
            if node in self.unreachable:
                raise rollout.TransportError(f"ssh to {node} failed: Connection refused")
            w = self.workers[node]
            if args[0] == "status":
                ok = self.app_ok(w)
                out = {"node": node, "vrrp_state": "UNKNOWN", "vrrp_since": None, "keepalived_running": None,
                       "configured_version": w.configured, "running_version": w.running,
                       "http_status": 200 if ok else 503, "app_health": 0 if ok else 1, "healthy": ok,
                       "maintenance": False, "track": None, "lock": None, "haproxy": None, "time": self.clock()}
            elif args[0] == "deploy":
                if args[1] in w.deploy_fails:
                    return rollout.RunResult(w.deploy_fails[args[1]], "", "docker compose pull failed: not found")
                w.configured = w.running = args[1]
                w.ready_at = self.clock() + self.health_delay
                out = {"node": node, "deployed": args[1]}
            else:
                raise AssertionError(f"{node}: a worker has no HAProxy, keepalived or lock: {args}")
            self.advance()
        if self.on_call:
            self.on_call(node, args)
        return rollout.RunResult(0, json.dumps(out) + "\n", "")

    def probe(self):
        """A client through the reserved IP gets whichever app the holder's HAProxy picks: a worker too."""
        with self._lock:
            self.step(0.01)
            app = self.picks(self.nodes[self.holder]) if self.holder else None
            if app is None:
                return rollout.Answer(None, None, None, "timeout")
            return rollout.Answer(200 if self.app_ok(app) else 503, app.name, app.running)

    def healthy_apps(self) -> int:
        return sum(self.app_ok(n) for n in (*self.nodes.values(), *self.workers.values()))


def make(pair: WorkerPair, batch: int = 1, **opts):
    tool, lines = make_tool(pair, batch=batch, **opts)
    for w in pair.workers:
        tool.stack.workers[w] = WORKER_IDS[w]
        tool.stack.hosts[w] = f"192.0.2.{30 + int(w[7:])}"
    tool.workers = list(pair.workers)
    # Every step of the simulation: how many app servers were healthy at that moment.
    pair.healthy_seen = []
    original = pair.advance

    def advance() -> None:
        original()
        pair.healthy_seen.append(pair.healthy_apps())
    pair.advance = advance
    return tool, lines


def do_rollout(pair: WorkerPair, version: str = "v2", batch: int = 1, **opts):
    tool, lines = make(pair, batch, **opts)
    return tool.execute("rollout", lambda: tool.rollout(version)), lines, tool


def deploy_order(pair: Pair) -> list[str]:
    return [nd for nd, _ in pair.commands(cmd="deploy")]


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("active,standby", [("primary", "standby"), ("standby", "primary")])
def test_workers_are_updated_first_one_at_a_time_then_the_standby_then_the_active(active, standby):
    pair = WorkerPair(workers=2, active=active)
    code, lines, tool = do_rollout(pair)
    assert code == rollout.EXIT_OK, lines
    assert deploy_order(pair) == ["worker-1", "worker-2", standby, active]
    # Each worker out of both nodes' HAProxy (the active's first) before its deploy, back in after.
    assert server_calls(pair)[:8] == [
        (active, "worker-1", "maint"), (standby, "worker-1", "maint"),
        (standby, "worker-1", "ready"), (active, "worker-1", "ready"),
        (active, "worker-2", "maint"), (standby, "worker-2", "maint"),
        (standby, "worker-2", "ready"), (active, "worker-2", "ready")]
    assert {w.configured for w in pair.workers.values()} | {n.configured for n in pair.nodes.values()} == {"v2"}
    assert pair.holder == active and pair.transitions == [] and pair.outage() == []
    assert pair.served() >= {("worker-1", "v2"), ("worker-2", "v2"), (active, "v2")}
    assert pair.out_of_rotation() == {} and {n.lock for n in pair.nodes.values()} == {None}
    assert set(tool.report.deploy_health_s) == {"worker-1", "worker-2", "primary", "standby"}
    assert min(pair.healthy_seen) == 3   # of 4: one app at a time out, never fewer than half


def test_batch_2_of_4_workers_takes_two_out_together_and_deploys_them_side_by_side():
    pair = WorkerPair(workers=4, health_delay=5.0)
    code, lines, _ = do_rollout(pair, batch=2)
    assert code == 0, lines
    assert deploy_order(pair)[:4] == ["worker-1", "worker-2", "worker-3", "worker-4"]
    order = [(nd, a[:3]) for _, nd, a in pair.calls]
    # Both of the first batch are out and deployed before either is back in rotation ...
    first_back = min(i for i, (_, a) in enumerate(order) if a in (("server", "worker-1", "ready"),
                                                                  ("server", "worker-2", "ready")))
    assert {("worker-1", ("deploy", "v2")), ("worker-2", ("deploy", "v2"))} <= set(order[:first_back])
    # ... and worker-3 is not taken out until both of the first batch are back in rotation.
    back = max(t for t, nd, a in pair.calls if a[:3] in (("server", "worker-1", "ready"), ("server", "worker-2", "ready")))
    out3 = min(t for t, nd, a in pair.calls if a[:3] == ("server", "worker-3", "maint"))
    assert out3 > back
    assert min(pair.healthy_seen) >= 4 and pair.outage() == []   # 6 app servers, 2 out at most: 4 left


@pytest.mark.parametrize("workers,batch", [(2, 3), (2, 0), (1, 2), (3, 3), (0, 2)])
def test_a_batch_that_could_leave_fewer_than_half_serving_is_refused_before_anything_is_touched(workers, batch):
    pair = WorkerPair(workers=workers)
    code, lines, tool = do_rollout(pair, batch=batch)
    assert code == rollout.EXIT_USAGE
    assert f"--batch {batch}: must be 1.." in tool.report.message
    assert pair.commands(cmd="deploy") == [] and pair.commands(cmd="server") == []


def test_the_cli_names_batch_and_its_limit(tmp_path, monkeypatch, capsys):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({
        "reserved_ip": "203.0.113.10", "app_url": "http://203.0.113.10/",
        "nodes": {n: {"droplet_id": i, "public_ipv4": f"192.0.2.{i % 100}"} for n, i in IDS.items()},
        "workers": [{"droplet_id": WORKER_IDS[w], "public_ipv4": "192.0.2.31", "private_ipv4": "10.0.0.31"}
                    for w in ("worker-1", "worker-2", "worker-3")]}))
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", "dop_v1_test")
    code = rollout.main(["rollout", "--version", "v2", "--outputs", str(outputs), "--batch", "3"])
    err = capsys.readouterr().err
    assert code == rollout.EXIT_USAGE
    assert "--batch 3: must be 1..2 (the stack has 3 worker(s) and 5 app servers in all" in err


def test_the_half_rule_stops_before_a_batch_when_other_apps_died_meanwhile():
    pair = WorkerPair(workers=3)   # 5 app servers: at least 3 must stay healthy

    def two_die(node, args):
        if node == "worker-1" and tuple(args[:2]) == ("deploy", "v2"):
            pair.workers["worker-3"].broken = pair.nodes["standby"].broken = True
    pair.on_call = two_die
    code, lines, tool = do_rollout(pair)
    # worker-1 done; then primary, worker-1 and worker-2 are the 3 healthy: taking worker-2 out
    # would leave 2 of 5. Stopped before it; the standby's app is down, so the pair is degraded.
    assert code == rollout.EXIT_DEGRADED, lines
    assert "taking worker-2 out of rotation now would leave 2 of 5 app servers healthy, fewer than half" \
        in tool.report.message
    assert "standby, worker-3 not healthy" in tool.report.message
    assert deploy_order(pair) == ["worker-1"] and pair.commands("worker-2", "deploy") == []
    assert {a[1] for _, a in pair.commands(cmd="server")} == {"worker-1"}
    assert pair.workers["worker-1"].configured == "v2" and pair.out_of_rotation() == {}
    assert pair.outage() == []


def test_a_bad_version_on_a_worker_is_rolled_back_out_of_rotation_and_the_pair_is_never_touched():
    pair = WorkerPair(workers=2)
    code, lines, tool = do_rollout(pair, version="bad-v2")
    assert code == rollout.EXIT_FAILED, lines
    assert deploy_order(pair) == ["worker-1", "worker-1"]          # bad-v2, then the rollback to v1
    assert [a[1] for _, a in pair.commands("worker-1", "deploy")] == ["bad-v2", "v1"]
    for node in ("primary", "standby"):
        assert pair.touched(node) == {"server"}                     # only worker-1's HAProxy entries
        assert {a[1] for _, a in pair.commands(node, "server")} == {"worker-1"}
        assert pair.nodes[node].configured == "v1"
    assert pair.workers["worker-2"].configured == "v1" and pair.commands("worker-2", "deploy") == []
    assert not any(v == "bad-v2" for _, v in pair.served())       # never served
    assert pair.outage() == [] and pair.out_of_rotation() == {} and pair.transitions == []
    msg = tool.report.message
    assert "never became healthy on worker-1" in msg and "The pair was not touched" in msg


def test_a_worker_that_cannot_be_rolled_back_stays_out_and_is_degraded():
    pair = WorkerPair(workers=2)
    pair.workers["worker-1"].deploy_fails["v1"] = 5
    code, lines, tool = do_rollout(pair, version="bad-v2")
    assert code == rollout.EXIT_DEGRADED, lines
    assert pair.out_of_rotation() == {"primary": {"worker-1": "MAINT"}, "standby": {"worker-1": "MAINT"}}
    assert "could NOT be rolled back" in tool.report.message
    assert {n.configured for n in pair.nodes.values()} == {"v1"}


def test_an_unhealthy_worker_refuses_the_rollout_before_anything_is_touched():
    pair = WorkerPair(workers=2)
    pair.workers["worker-2"].broken = True
    code, lines, tool = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED
    assert "worker-2 is not healthy" in tool.report.message
    assert not any(pair.touched(n) for n in ("primary", "standby", "worker-1", "worker-2"))


def test_a_pair_haproxy_without_the_worker_refuses_the_rollout():
    pair = WorkerPair(workers=2)
    del pair.nodes["standby"].servers["worker-2"]
    code, _, tool = do_rollout(pair)
    assert code == rollout.EXIT_REFUSED and "standby's HAProxy has no server worker-2" in tool.report.message


def test_workers_already_on_the_version_are_skipped_and_a_pair_on_it_too_is_a_no_op():
    pair = WorkerPair(workers=2)
    pair.workers["worker-1"].configured = pair.workers["worker-1"].running = "v2"
    for n in pair.nodes.values():
        n.configured = n.running = "v2"
    code, lines, _ = do_rollout(pair)
    assert code == 0 and deploy_order(pair) == ["worker-2"]
    assert not any(pair.commands(n, "deploy") for n in ("primary", "standby"))
    code, lines, _ = do_rollout(pair)
    assert code == 0 and any("nothing to do: both nodes and every worker run v2" in ln for ln in lines)


def test_outputs_without_workers_or_with_an_empty_list_are_the_pair_alone():
    doc = {"reserved_ip": "203.0.113.10", "app_url": "http://203.0.113.10/",
           "nodes": {n: {"droplet_id": i, "public_ipv4": "192.0.2.1"} for n, i in IDS.items()}}
    assert rollout.parse_outputs(doc).workers == {}
    assert rollout.parse_outputs({**doc, "workers": []}).workers == {}
    two = rollout.parse_outputs({**doc, "workers": [{"droplet_id": 7, "public_ipv4": "192.0.2.31"},
                                                    {"droplet_id": 8, "public_ipv4": "192.0.2.32"}]})
    assert two.workers == {"worker-1": 7, "worker-2": 8} and two.hosts["worker-2"] == "192.0.2.32"
    assert sorted(two.droplets) == ["primary", "standby"]
    with pytest.raises(rollout.ToolError, match=r"workers\[0\] needs an integer droplet_id and a public_ipv4"):
        rollout.parse_outputs({**doc, "workers": [{"droplet_id": 7, "private_ipv4": "10.0.0.7"}]})


def test_no_workers_is_exactly_the_pairs_rollout():
    from tests.unit.test_rollout import do_rollout as pair_rollout

    plain, with_empty = Pair(), WorkerPair(workers=0)
    code_a, lines_a, _ = pair_rollout(plain)
    code_b, lines_b, _ = do_rollout(with_empty)
    assert code_a == code_b == 0
    assert [(nd, a) for _, nd, a in plain.calls] == [(nd, a) for _, nd, a in with_empty.calls]
    assert lines_a == lines_b and OWNER not in "".join(lines_a).replace(f"as {OWNER}", "")
