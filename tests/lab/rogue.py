"""A rogue VRRP speaker: adverts for our router ID with a higher priority, from a third VPC host.

    python -m tests.lab.rogue --vrid 51 --priority 254 --to 198.51.100.11 --to 198.51.100.12 \
        --seconds 5 --interval 0.1

Sends VRRPv3 and VRRPv2 adverts (both versions, unicast to each target and multicast to
224.0.0.18) through a raw IP socket with TTL 255, as a real router would. If one of them reached
keepalived, the MASTER would step down to the rogue's higher priority; the node firewall and
`vrrp_check_unicast_src` must make sure nothing happens.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import struct
import sys
import time

IPPROTO_VRRP = 112
VRRP_MCAST = "224.0.0.18"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def advert_v3(vrid: int, priority: int, vip: str, src: str, dst: str, interval_cs: int = 20) -> bytes:
    """RFC 5798 advert; the checksum covers an IPv4 pseudo-header."""
    addr = ipaddress.IPv4Address(vip).packed
    body = struct.pack("!BBBBH", 0x31, vrid, priority, 1, interval_cs & 0x0FFF) + b"\0\0" + addr
    pseudo = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack(
        "!BBH", 0, IPPROTO_VRRP, len(body))
    csum = _checksum(pseudo + body)
    return body[:6] + struct.pack("!H", csum) + body[8:]


def advert_v2(vrid: int, priority: int, vip: str, interval_s: int = 1) -> bytes:
    """RFC 3768 advert, no authentication."""
    addr = ipaddress.IPv4Address(vip).packed
    body = struct.pack("!BBBBBBH", 0x21, vrid, priority, 1, 0, interval_s, 0) + addr + b"\0" * 8
    csum = _checksum(body)
    return body[:6] + struct.pack("!H", csum) + body[8:]


def send(vrid: int, priority: int, vip: str, src: str, targets: list[str], seconds: float,
         interval: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_VRRP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    sock.bind((src, 0))
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for dst in [*targets, VRRP_MCAST]:
            for packet in (advert_v3(vrid, priority, vip, src, dst), advert_v2(vrid, priority, vip)):
                try:
                    sock.sendto(packet, (dst, 0))
                    sent += 1
                except OSError as exc:
                    print(f"rogue: send to {dst} failed: {exc}", file=sys.stderr)
        time.sleep(interval)
    sock.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vrid", type=int, default=51)
    ap.add_argument("--priority", type=int, default=254)
    ap.add_argument("--vip", default="203.0.113.10")
    ap.add_argument("--src", default="198.51.100.66")
    ap.add_argument("--to", action="append", default=[], help="unicast target (repeatable)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.1)
    args = ap.parse_args(argv)
    sent = send(args.vrid, args.priority, args.vip, args.src, args.to, args.seconds, args.interval)
    print(f"rogue: sent {sent} VRRP adverts (vrid {args.vrid}, priority {args.priority})")
    return 0 if sent else 1


if __name__ == "__main__":
    sys.exit(main())
