"""Run the program without a cloud: Pulumi mocks that record every resource's inputs.

Used by the stack tests (tests/stack) and by `make plan` (scripts/plan.py). The mocks answer
like DigitalOcean would (camelCase computed outputs: ipv4AddressPrivate, ipAddress, ...) with
addresses from the documentation ranges and distinct values per droplet, so tests can tell the
nodes apart.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import pulumi

SECRET_SIG = "4dabf18193072939515e22adb298388d"  # noqa: S105 - how the engine marks a secret value on the wire


@dataclass
class Recorded:
    typ: str
    name: str
    inputs: dict[str, Any]
    resource_id: str | None = None  # set for `.get()` reads

    def plain(self, key: str) -> Any:
        return unwrap(self.inputs.get(key))

    def is_secret(self, key: str) -> bool:
        value = self.inputs.get(key)
        return isinstance(value, dict) and SECRET_SIG in value


def unwrap(value: Any) -> Any:
    """Strip the engine's secret wrappers, recursively."""
    if isinstance(value, dict):
        if SECRET_SIG in value:
            return unwrap(value.get("value"))
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


@dataclass
class DoMocks(pulumi.runtime.Mocks):
    """Answers for DigitalOcean and pulumi-command resources; records every registration."""

    vpc_range: str = "10.110.16.0/24"
    reserved_ip: str = "203.0.113.10"
    # What getReservedIp/getDroplet answer for an adopted reserved IP: its holder and droplets' tags.
    reserved_ip_holder: int | None = None
    droplet_tags: dict[int, list[str]] = field(default_factory=dict)
    # What tls:PrivateKey answers (the stack's provisioning key); the twins put their own key here.
    provision_key: tuple[str, str] = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nmock-provision-key\n-----END OPENSSH PRIVATE KEY-----\n",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1vY2stcHJvdmlzaW9uLWtleS1mb3ItdGVzdHM\n",
    )
    database_ca: str = "-----BEGIN CERTIFICATE-----\nmock-project-ca\n-----END CERTIFICATE-----\n"
    resources: list[Recorded] = field(default_factory=list)
    # Each resource's options (parent, depends_on, protect, ...), which the mock monitor never sees.
    options: dict[str, pulumi.ResourceOptions] = field(default_factory=dict)

    def host_key(self, name: str) -> tuple[str, str]:
        """(private, public) OpenSSH host key for the tls.PrivateKey `name`: a fixed fake per name."""
        tag = hashlib.sha256(name.encode()).hexdigest()[:32]
        return (f"-----BEGIN OPENSSH PRIVATE KEY-----\nmock-host-key-{tag}\n-----END OPENSSH PRIVATE KEY-----\n",
                f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5{tag}\n")

    def _droplet_index(self, name: str) -> int:
        for i, role in enumerate(("primary", "standby"), start=1):
            if name.endswith(role):
                return i
        worker = re.search(r"-worker-([0-9]+)$", name)
        if worker:  # app workers: 3, 4, ... (distinct, so their addresses never collide)
            return 2 + int(worker.group(1))
        return 3 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 50

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.resources.append(Recorded(args.typ, args.name, dict(args.inputs), args.resource_id or None))
        outputs = dict(args.inputs)
        rid = f"{args.name}-id"
        if args.typ == "digitalocean:index/droplet:Droplet":
            # Values follow from the name, not from registration order (which asyncio does not fix),
            # so a plan or a golden file is the same on every run.
            n = self._droplet_index(args.name)
            hosts = list(ipaddress.ip_network(self.vpc_range).hosts())
            rid = str(400000000 + n)
            outputs.update(
                ipv4AddressPrivate=str(hosts[1 + n]),
                ipv4Address=f"192.0.2.{20 + n}",
                status="active",
                urn=f"do:droplet:{rid}",
            )
        elif args.typ == "digitalocean:index/reservedIp:ReservedIp":
            rid = args.resource_id or self.reserved_ip
            outputs.update(ipAddress=rid, region=args.inputs.get("region") or "fra1",
                           urn=f"do:floatingip:{rid}")
        elif args.typ == "digitalocean:index/vpc:Vpc":
            rid = "c0ffee00-0000-4000-8000-000000000001"
            outputs.update(urn=f"do:vpc:{rid}")
        elif args.typ == "digitalocean:index/sshKey:SshKey":
            rid = "41000001"
            outputs.update(fingerprint="3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:fa")
        elif args.typ == "digitalocean:index/databaseCluster:DatabaseCluster":
            rid = "d0000000-0000-4000-8000-000000000001"
            outputs.update(privateHost="private-db.example.invalid", host="db.example.invalid", port=25060,
                           database="defaultdb", user="doadmin", password="mock-admin-password",  # noqa: S106
                           urn=f"do:dbaas:{rid}")
        elif args.typ == "digitalocean:index/databaseUser:DatabaseUser":
            outputs.update(password="mock-user-password")  # noqa: S106
        elif args.typ == "tls:index/privateKey:PrivateKey":
            if args.name.endswith("-provision-key"):
                private, public = self.provision_key
            else:
                # A fixed fake key per name (never a real key): tests and plans stay byte-identical.
                private, public = self.host_key(args.name)
            outputs.update(privateKeyOpenssh=private, publicKeyOpenssh=public)
        elif args.typ.startswith("command:"):
            outputs.update(stdout="", stderr="")
        return [rid, outputs]

    def call(self, args: pulumi.runtime.MockCallArgs):
        # Provider calls: who holds an adopted reserved IP (infra/adopt.py), a cluster's CA.
        function = args.token  # an invoke's name, not a credential
        if function == "digitalocean:index/getReservedIp:getReservedIp":
            holder = self.reserved_ip_holder
            return {"ipAddress": args.args.get("ipAddress"), "region": "fra1", "dropletId": holder or 0}
        if function == "digitalocean:index/getDatabaseCa:getDatabaseCa":
            return {"clusterId": args.args.get("clusterId"), "certificate": self.database_ca}
        if function == "digitalocean:index/getDroplet:getDroplet":
            droplet_id = int(args.args.get("id"))
            return {"id": droplet_id, "name": f"droplet-{droplet_id}", "tags": self.droplet_tags.get(droplet_id, [])}
        return {}

    # -- queries used by tests and the plan -----------------------------------------------------
    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.typ == typ]

    def named(self, name: str) -> Recorded:
        matches = [r for r in self.resources if r.name == name]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} resources named {name}: {[r.name for r in self.resources]}")
        return matches[0]


@dataclass
class Resolved:
    value: Any
    secret: bool


def run_offline(fn, mocks: DoMocks, project: str = "minitwit-ha", stack: str = "test",
                config: dict[str, str] | None = None, secret_keys: list[str] | None = None,
                preview: bool = False) -> dict[str, Resolved]:
    """Run `fn()` (which declares resources and returns a dict of outputs) under `mocks` and
    return each output's resolved value and whether it is secret."""
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=preview)
    pulumi.runtime.set_all_config(config or {}, secret_keys or [])
    results: dict[str, Resolved] = {}

    def record_options(args: pulumi.ResourceTransformationArgs):
        mocks.options[args.name] = args.opts
        return None  # observe only

    @pulumi.runtime.test
    def _program():
        pulumi.runtime.register_stack_transformation(record_options)
        return _collect_via_outputs(list(fn().items()), results)

    _program()
    return results


def _collect_via_outputs(items, results) -> pulumi.Output:
    """Resolve each output (and its secretness) inside the mocked run."""
    import asyncio

    async def one(key, value):
        out = pulumi.Output.from_input(value)
        results[key] = Resolved(await out.future(with_unknowns=True), await out.is_secret())

    async def all_():
        await asyncio.gather(*(one(k, v) for k, v in items))
        return True

    return pulumi.Output.from_input(asyncio.ensure_future(all_()))
