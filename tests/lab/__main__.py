"""python -m tests.lab up|status|fault NODE KIND|heal NODE KIND|drill|demo|down [--twins]

The lab: the stack's two nodes, the database, the internet and a fake DigitalOcean API in
network namespaces on this machine (root). See tests/lab/lab.py for the topology. With --twins
the nodes are droplet twins (booted Debian 12, provisioned by the stack: tests/twins/twinlab.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from infra.haproxy import SERVE_MODES
from tests.lab.lab import API_PRESETS, FAULT_KINDS, NODES, Lab, LabError


def add_api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", default="realistic", choices=sorted(API_PRESETS),
                        help="the fake DigitalOcean API's timing: realistic (default: an assign completes "
                             f"after {API_PRESETS['realistic'][0]:g} s, +{API_PRESETS['realistic'][1]:g} s per "
                             "request) or ideal (instant)")
    parser.add_argument("--api-action-s", type=float, help="seconds an assign action stays in-progress")
    parser.add_argument("--api-latency-s", type=float, help="seconds added to every API request")
    parser.add_argument("--serve", default="active-standby", choices=SERVE_MODES,
                        help="HAProxy: the local app first (active-standby, default) or both apps balanced")


def api_kwargs(args: argparse.Namespace) -> dict:
    return {"api": args.api, "api_action_s": args.api_action_s, "api_latency_s": args.api_latency_s,
            "serve": args.serve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab and wait until one node is MASTER and serving")
    up.add_argument("--profile", default="fast", help="timing profile: fast (default) or tutorial")
    add_api_options(up)
    up.add_argument("--workers", type=int, default=0, help="app workers behind both nodes' HAProxy (appWorkers)")
    sub.add_parser("status", help="JSON: each node's VRRP state and app version, the reserved IP's holder")
    for name in ("fault", "heal"):
        p = sub.add_parser(name, help=f"{name} a fault: {', '.join(FAULT_KINDS)}")
        p.add_argument("node", choices=NODES)
        p.add_argument("kind", choices=FAULT_KINDS)
        if name == "fault":
            p.add_argument("--count", type=int, default=3, help="api: how many assigns fail (500, 429, 422, ...)")
    drill = sub.add_parser("drill", help="run the failover drill; write the report and print a table")
    drill.add_argument("--profile", default="fast")
    drill.add_argument("--runs", type=int, default=3, help="runs per scenario (failover_s is their median)")
    drill.add_argument("--report", default="drill-report.json")
    drill.add_argument("--scenarios", help="comma-separated subset of scenario names")
    drill.add_argument("--steady-s", type=float, default=300.0, help="length of the no-spurious-failover run")
    add_api_options(drill)
    demo = sub.add_parser("demo", help="up, a short drill with the report, down (the newcomer's first command)")
    demo.add_argument("--profile", default="fast")
    add_api_options(demo)
    sub.add_parser("down", help="tear the lab down (also after an interrupted run)")
    for name, p in sub.choices.items():
        if name != "demo":
            p.add_argument("--twins", action="store_true",
                           help="the nodes are droplet twins: booted Debian 12 provisioned by the stack (root)")
    args = ap.parse_args(argv)

    if getattr(args, "twins", False):
        from tests.twins.twinlab import TwinLab

        lab = TwinLab()
    else:
        lab = Lab()
    try:
        if args.cmd == "up":
            lab.up(profile=args.profile, **api_kwargs(args))
            if args.workers:
                try:
                    lab.add_workers(args.workers)
                except BaseException:
                    lab.down()
                    raise
            print(json.dumps(lab.status(), indent=2))
        elif args.cmd == "status":
            if not lab.is_up:
                print(json.dumps({"up": False}))
                return 1
            print(json.dumps(lab.status(), indent=2))
        elif args.cmd == "fault":
            lab.fault(args.node, args.kind, count=args.count)
        elif args.cmd == "heal":
            lab.heal(args.node, args.kind)
        elif args.cmd == "down":
            for note in lab.down():
                print(note, file=sys.stderr)
        elif args.cmd in ("drill", "demo"):
            from tests.lab.drill import main_demo, main_drill

            if args.cmd == "drill" and getattr(args, "twins", False):
                from tests.lab.drill import load_extra_scenarios

                load_extra_scenarios()
                importlib.import_module("tests.twins.scenarios")  # after the lab's: twins play a real reboot
                lab.up(profile=args.profile, wait=False, **api_kwargs(args))
                try:
                    return main_drill(profile=args.profile, runs=args.runs, report=args.report,
                                      only=args.scenarios.split(",") if args.scenarios else None,
                                      steady_s=args.steady_s, lab=lab, **api_kwargs(args))
                finally:
                    lab.down()
            if args.cmd == "drill":
                return main_drill(profile=args.profile, runs=args.runs, report=args.report,
                                  only=args.scenarios.split(",") if args.scenarios else None,
                                  steady_s=args.steady_s, **api_kwargs(args))
            return main_demo(profile=args.profile, **api_kwargs(args))
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
