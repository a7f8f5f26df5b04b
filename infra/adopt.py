"""Adopting an existing reserved IP: never take one silently from a droplet outside the stack.

The usual adopted address is the old single server's: it is assigned to that droplet and serves
the course's traffic. The pair's first MASTER would move it away the moment keepalived starts.
So before any resource is declared, the program reads who holds the address (a provider call,
so `pulumi preview` stops too) and refuses unless the holder is one of this stack's own droplets
(tagged minitwit-ha:STACK; after a failover the IP is always on one of them) or the operator set
reservedIpTakeover. Nothing here runs when reservedIp is empty.
"""

from __future__ import annotations

import pulumi_digitalocean as do

from infra.settings import Problem, Settings, SettingsError


def stack_tag(stack: str) -> str:
    """The tag every droplet of this stack carries (infra/ha_pair.py puts it on both)."""
    return "minitwit-ha:" + "".join(c if c.isalnum() or c in "-_:" else "-" for c in stack)


def check_reserved_ip_holder(settings: Settings) -> None:
    if not settings.reserved_ip or settings.reserved_ip_takeover:
        return
    holder = do.get_reserved_ip(ip_address=settings.reserved_ip).droplet_id
    if not holder:
        return  # unassigned: the first MASTER takes it, as intended
    droplet = do.get_droplet(id=int(holder))
    if stack_tag(settings.stack) in (droplet.tags or []):
        return  # already ours (a failover moved it between our own droplets)
    raise SettingsError([Problem(
        "reservedIp",
        f"{settings.reserved_ip} is assigned to droplet {holder} ({droplet.name}), which is not part of this "
        "stack; the pair's first MASTER would move it away from there. Unassign it (`doctl compute "
        "reserved-ip-action unassign IP`) when you cut over, or set reservedIpTakeover true to let the pair "
        "take it",
    )], settings.stack)
