"""Stack settings: read once from config, validated before any resource is declared.

`load_settings(source, ...)` turns raw config values into a frozen `Settings` or raises
`SettingsError` listing *every* problem at once, each naming the config key and what would be
valid. Nothing here touches Pulumi at import time; the Pulumi-backed `ConfigSource` lives in
`infra.config_source` so tests and `make plan` can feed plain dictionaries.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import yaml

from infra.haproxy import METRICS_PORT, MONITOR_PORT, SERVE_MODES
from infra.node import NODE_EXPORTER_PORT
from infra.profiles import PROFILES
from infra.schema import PROJECT, ConfigKey, load_schema

# Secrets that are optional. Pulumi refuses a plaintext default on a `secret: true` key, so the
# schema cannot mark them; we refuse a value that was not set with `pulumi config set --secret`.
OPTIONAL_SECRETS = frozenset({"registryPassword", "databaseUri", "alertWebhookUrl", "sshPrivateKey"})

# Region slugs DigitalOcean offers droplets, reserved IPs and VPCs in (checked 2026).
KNOWN_REGIONS = (
    "ams3", "atl1", "blr1", "fra1", "lon1", "nyc1", "nyc2", "nyc3", "sfo2", "sfo3", "sgp1",
    "syd1", "tor1",
)
# Images whose packaged keepalived is 2.2.x (Debian 12: 2.2.7, Ubuntu 22.04: 2.2.4, 24.04: 2.2.8).
SUPPORTED_IMAGES = ("debian-12-x64", "ubuntu-22-04-x64", "ubuntu-24-04-x64")
# appWorkers: each worker is one more droplet (DigitalOcean caps droplets per account) and one more
# server in both nodes' HAProxy; past ten, a managed Load Balancer is the better front (README).
MAX_APP_WORKERS = 10

# Ranges a VPC must not overlap. DigitalOcean reserves some for its own networks; Docker takes
# 172.17-31.x and 192.168.x for its bridges on the droplets, where a clash breaks routing.
FORBIDDEN_VPC_RANGES = {
    "10.244.0.0/16": "reserved by DigitalOcean",
    "10.245.0.0/16": "reserved by DigitalOcean",
    "10.246.0.0/24": "reserved by DigitalOcean",
    "10.229.0.0/16": "reserved by DigitalOcean",
    "172.17.0.0/16": "Docker's default bridge on the droplets",
    "172.18.0.0/15": "Docker's default address pools on the droplets",
    "172.20.0.0/14": "Docker's default address pools on the droplets",
    "172.24.0.0/13": "Docker's default address pools on the droplets",
    "192.168.0.0/16": "Docker's default address pools on the droplets",
}
RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))

_REGION_RE = re.compile(r"^[a-z]{3}[0-9]$")
_SIZE_RE = re.compile(r"^(s|c|c2|g|gd|m|m3|m6|so|so1_5|gpu)-[a-z0-9]+(-[a-z0-9]+)*$")
_IFACE_RE = re.compile(r"^[a-z][a-z0-9]{0,14}$")
_FINGERPRINT_RE = re.compile(r"^([0-9a-f]{2}:){15}[0-9a-f]{2}$")
_PUBKEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,3}( \S.*)?$"
)
_TOKEN_RE = re.compile(r"^(dop_v1_)?[0-9a-f]{64}$")
_REGISTRY_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$")
# An image repository without a tag: optional registry host[:port]/, then lower-case path components.
_IMAGE_RE = re.compile(r"^([a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?/)?"
                       r"[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$")
# The documented placeholder default of `appImage`: a name that says what to put there.
APP_IMAGE_PLACEHOLDER = "ghcr.io/your-org/minitwit"
# DigitalOcean runs standby nodes only on plans with 2 GB of RAM or more ("due to the memory
# requirements of replication", docs: PostgreSQL "How to Add Standby Nodes").
STANDBY_MIN_RAM_GB = 2
_DB_SIZE_RAM_RE = re.compile(r"-([0-9]+)gb$")


class ConfigSource(Protocol):
    """Raw config as Pulumi stores it: strings (arrays as JSON text), plus which keys are secret."""

    def get(self, key: str) -> str | None: ...

    def is_secret(self, key: str) -> bool: ...

    def keys(self) -> list[str]: ...


def config_string(value: Any) -> str:
    """A value as Pulumi hands config to a program: lists and maps as JSON, booleans as true/false."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class DictSource:
    """A ConfigSource over plain values (tests, `make plan`). Lists are JSON-encoded like Pulumi does."""

    values: Mapping[str, Any]
    secret_keys: frozenset[str] = frozenset()

    def get(self, key: str) -> str | None:
        return config_string(self.values[key]) if key in self.values else None

    def is_secret(self, key: str) -> bool:
        return key in self.secret_keys

    def keys(self) -> list[str]:
        return list(self.values)


class Secret:
    """A secret string that refuses to show itself in reprs, f-strings and logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


@dataclass(frozen=True)
class Registry:
    server: str
    username: str
    password: Secret


@dataclass(frozen=True)
class Compose:
    path: Path
    text: str
    services: tuple[str, ...]


@dataclass(frozen=True)
class Database:
    mode: str  # managed | external | none
    uri: Secret | None = None
    size: str = "db-s-1vcpu-1gb"
    version: str = "16"
    node_count: int = 1
    sslmode: str = "verify-full"  # databaseSslMode: what the app's URI asks libpq to check


@dataclass(frozen=True)
class NodeOverride:
    """One node's own dropletSize/dropletImage (empty: the stack-wide value)."""

    droplet_size: str = ""
    droplet_image: str = ""


@dataclass(frozen=True)
class Settings:
    stack: str
    region: str
    vpc_ip_range: str
    droplet_size: str
    droplet_image: str
    private_interface: str
    ssh_public_key: str | None
    ssh_key_fingerprints: tuple[str, ...]
    admin_cidrs: tuple[str, ...]
    reserved_ip: str | None
    compose: Compose
    health_url: str
    app_port: int
    registry: Registry | None
    failover_token: Secret
    protect: bool
    failover_profile: str
    vrrp_router_id: int
    database: Database = field(default_factory=lambda: Database(mode="none"))
    app_image: str = APP_IMAGE_PLACEHOLDER
    # An adopted reservedIp that another droplet holds may be taken over (see infra/adopt.py).
    reserved_ip_takeover: bool = False
    alert_webhook_url: Secret | None = None  # None: no alerts (the node gets an empty webhook file)
    stale_private_key: bool = False  # sshPrivateKey is still set: unused, the program warns
    app_backend_port: int = 5000       # HAProxy's backends: the local and the peer's app
    serve: str = "active-standby"
    app_check_path: str = ""           # empty: TCP checks
    app_workers: int = 0               # app-only droplets behind both nodes' HAProxy (appWorkers)
    # The image tag a new or replaced node starts with (MINITWIT_VERSION); empty: "latest". The
    # rollout owns the version of a running node; this only seeds a node whose .env has none.
    app_version: str = ""
    # Per-node size/image (nodeOverrides): lets resize and reimage reach one node per `pulumi up`.
    node_overrides: Mapping[str, NodeOverride] = field(default_factory=dict)

    def node_size(self, node: str) -> str:
        o = self.node_overrides.get(node)
        return o.droplet_size if o and o.droplet_size else self.droplet_size

    def node_image(self, node: str) -> str:
        o = self.node_overrides.get(node)
        return o.droplet_image if o and o.droplet_image else self.droplet_image

    def rebuilds(self, node: str) -> bool:
        """A node with its own dropletImage is (re)built from the current image, user data and keys."""
        o = self.node_overrides.get(node)
        return bool(o and o.droplet_image)

    @property
    def http_ports(self) -> tuple[int, ...]:
        """Ports the host firewall opens to everyone: HTTP, HTTPS and the app's own port."""
        return tuple(sorted({80, 443, self.app_port}))

    @property
    def health_path(self) -> str:
        parts = urlsplit(self.health_url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{PROJECT}:{self.key}: {self.message}"


class SettingsError(ValueError):
    """Every configuration problem found, each naming its key and what would be valid."""

    def __init__(self, problems: list[Problem], stack: str = "") -> None:
        self.problems = problems
        where = f" in stack '{stack}'" if stack else ""
        lines = [f"{len(problems)} configuration problem(s){where}; nothing was created or changed:"]
        lines += [f"  - {p}" for p in problems]
        lines.append("Fix with `pulumi config set KEY VALUE` (secrets: `pulumi config set --secret KEY`).")
        super().__init__("\n".join(lines))


class _Reader:
    """Collects problems while reading typed values with the schema's defaults."""

    def __init__(self, source: ConfigSource, schema: Mapping[str, ConfigKey]) -> None:
        self.source = source
        self.schema = schema
        self.problems: list[Problem] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def raw(self, key: str) -> str | None:
        value = self.source.get(key)
        if value is None:
            # The schema's default, in the form the Pulumi CLI would have passed it.
            default = self.schema[key].default
            return None if default is None else config_string(default)
        return value

    def string(self, key: str) -> str:
        value = self.raw(key)
        if value is None:
            self.fail(key, f"is required ({self.schema[key].description_first_sentence})")
            return ""
        return value.strip()

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.raw(key)
        default = self.schema[key].default
        try:
            number = int(str(value).strip())
        except (TypeError, ValueError):
            self.fail(key, f"'{value}' is not an integer; use a whole number from {low} to {high}")
            return int(default) if isinstance(default, int) else low
        if not low <= number <= high:
            self.fail(key, f"{number} is out of range; use a whole number from {low} to {high}")
        return number

    def boolean(self, key: str) -> bool:
        value = (self.raw(key) or "").strip().lower()
        if value in ("true", "false"):
            return value == "true"
        self.fail(key, f"'{value}' is not a boolean; use true or false")
        return False

    def string_list(self, key: str) -> list[str] | None:
        value = self.raw(key)
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            self.fail(key, f"must be a list of strings, e.g. `pulumi config set --path '{key}[0]' VALUE`")
            return []
        return [v.strip() for v in parsed]

    def secret(self, key: str, required: bool) -> Secret | None:
        value = self.source.get(key)
        if value is None or value.strip() == "":
            if required:
                self.fail(key, f"is required and secret: `pulumi config set --secret {key}` "
                               f"({self.schema[key].description_first_sentence})")
            return None
        if not self.source.is_secret(key):
            # Never echo the value: it was meant to be a secret.
            self.fail(key, f"was set in plaintext; set it again with `pulumi config set --secret {key}` "
                           "(and rotate it: the plaintext value is in the stack file's history)")
        return Secret(value.strip())


_NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/3",
))


def _not_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Private, shared, loopback, link-local, multicast or reserved: never a reserved IP. (The
    documentation ranges pass, so tests and examples can use them.)"""
    return any(addr in net for net in _NOT_PUBLIC)


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(value, strict=True)


def _check_vpc_range(r: _Reader, key: str, value: str) -> str:
    try:
        net = _network(value)
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f" (did you mean {ipaddress.ip_network(value, strict=False)}?)"
        r.fail(key, f"'{value}' is not a valid network in CIDR notation{hint}: {exc}")
        return value
    if net.version != 4 or not any(net.subnet_of(p) for p in RFC1918):
        r.fail(key, f"{net} is not a private range; use an RFC 1918 range such as 10.110.16.0/24")
        return value
    if not 16 <= net.prefixlen <= 28:
        r.fail(key, f"/{net.prefixlen} is outside what DigitalOcean allows for a VPC; use /16 to /28")
    for forbidden, why in FORBIDDEN_VPC_RANGES.items():
        if net.overlaps(ipaddress.ip_network(forbidden)):
            r.fail(key, f"{net} overlaps {forbidden} ({why}); choose a range inside 10.0.0.0/8 "
                        "away from 10.229/16 and 10.244-10.246")
            break
    return str(net)


def _check_admin_cidrs(r: _Reader, key: str, values: list[str] | None) -> tuple[str, ...]:
    if values is None:
        r.fail(key, "is required: the CIDRs allowed to SSH to the droplets, e.g. "
                    f"`pulumi config set --path '{key}[0]' 203.0.113.0/24`")
        return ()
    if not values:
        r.fail(key, "is empty; list at least one CIDR allowed to SSH (your office or CI egress), "
                    "or nobody, Pulumi included, can provision the droplets")
        return ()
    out: list[str] = []
    for i, value in enumerate(values):
        try:
            net = _network(value)
        except ValueError:
            try:
                hint = f"; did you mean {ipaddress.ip_network(value, strict=False)}?"
            except ValueError:
                hint = "; use a network like 203.0.113.0/24 or a host like 203.0.113.7/32"
            r.fail(f"{key}[{i}]", f"'{value}' is not a valid CIDR{hint}")
            continue
        if net.prefixlen == 0:
            r.fail(f"{key}[{i}]", f"{net} opens SSH to the whole internet; list the networks you administer from")
            continue
        out.append(str(net))
    return tuple(out)


# The compose variables the stack writes into the app's `.env` on each node (infra.node.render_stack_env).
PRIVATE_IP_VAR = "MTHA_PRIVATE_IPV4"
BACKEND_PORT_VAR = "MTHA_APP_BACKEND_PORT"
_VAR_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)(?:[:?-][^}]*)?\}?")
_PUBLISH_EXAMPLE = (f'ports: ["127.0.0.1:${{{BACKEND_PORT_VAR}}}:5000", '
                    f'"${{{PRIVATE_IP_VAR}}}:${{{BACKEND_PORT_VAR}}}:5000"]')


def _published(spec: object, backend_port: int) -> tuple[str, str, str] | None:
    """(host IP, host port, text) of one `ports:` entry, the stack's variables resolved to
    "vpc" / the backend port; None when it cannot be read."""
    resolved = {PRIVATE_IP_VAR: "vpc", BACKEND_PORT_VAR: str(backend_port)}

    def resolve(text: str) -> str:
        return _VAR_RE.sub(lambda m: resolved.get(m.group(1), m.group(0)), text)

    if isinstance(spec, dict):
        host_ip, published = resolve(str(spec.get("host_ip", ""))), resolve(str(spec.get("published", "")))
        text = json.dumps(spec)
    elif isinstance(spec, (str, int)):
        text = str(spec)
        body = resolve(text).rsplit("/", 1)[0]
        if body.startswith("["):
            ip, _, rest = body[1:].partition("]")
            parts = [ip, *rest.lstrip(":").split(":")]
        else:
            parts = body.split(":")
        if len(parts) == 1:
            host_ip, published = "", ""
        elif len(parts) == 2:
            host_ip, published = "", parts[0]
        elif len(parts) == 3:
            host_ip, published = parts[0], parts[1]
        else:
            return None
    else:
        return None
    return host_ip, published, text


def _check_ports(r: _Reader, key: str, path: Path, services: dict, backend_port: int) -> None:
    """The app is published on 127.0.0.1 and the node's VPC address only: HAProxy owns the public
    port, and the firewall lets only the peer reach the backend port over the VPC."""
    reached: set[str] = set()
    for name, spec in services.items():
        if not isinstance(spec, dict):
            continue
        if spec.get("network_mode") == "host":
            r.fail(key, f"service '{name}' in {path} uses network_mode: host, which publishes whatever it listens "
                        f"on, on every address; publish ports instead: {_PUBLISH_EXAMPLE}")
        for entry in spec.get("ports") or []:
            parsed = _published(entry, backend_port)
            if parsed is None:
                r.fail(key, f"service '{name}' in {path}: cannot read port entry {entry!r}; use {_PUBLISH_EXAMPLE}")
                continue
            host_ip, published, text = parsed
            if host_ip not in ("127.0.0.1", "vpc"):
                where = f"on {host_ip}" if host_ip else "without a host IP, i.e. on every address"
                r.fail(key, f"service '{name}' in {path} publishes '{text}' {where}; HAProxy owns the public port, "
                            f"so publish only on 127.0.0.1 and ${{{PRIVATE_IP_VAR}}}: {_PUBLISH_EXAMPLE}")
            elif published == str(backend_port):
                reached.add(host_ip)
    labels = {"127.0.0.1": "127.0.0.1", "vpc": f"${{{PRIVATE_IP_VAR}}}"}
    if services and reached != labels.keys():
        missing = " and ".join(labels[h] for h in sorted(labels.keys() - reached))
        r.fail(key, f"no service in {path} publishes appBackendPort ({backend_port}) on {missing}: HAProxy and the "
                    f"health checks reach the app there; {_PUBLISH_EXAMPLE}")


def _check_compose(r: _Reader, key: str, value: str, project_dir: Path, backend_port: int) -> Compose:
    path = (project_dir / value).resolve() if not Path(value).is_absolute() else Path(value)
    empty = Compose(path=path, text="", services=())
    if not value:
        r.fail(key, "is empty; give the path of the docker compose file to deploy, e.g. deploy/compose.yaml")
        return empty
    if not path.is_file():
        r.fail(key, f"{path} does not exist; give the path (relative to the project) of the compose file")
        return empty
    text = path.read_text()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        r.fail(key, f"{path} is not valid YAML: {str(exc).splitlines()[0]}")
        return empty
    services = doc.get("services") if isinstance(doc, dict) else None
    if not isinstance(services, dict) or not services:
        r.fail(key, f"{path} has no services; a compose file needs a `services:` mapping with at least one service")
        return empty
    for name, spec in services.items():
        if not isinstance(spec, dict) or not spec.get("image"):
            r.fail(key, f"service '{name}' in {path} has no image; the droplets pull images, they never build")
    _check_ports(r, key, path, services, backend_port)
    return Compose(path=path, text=text, services=tuple(sorted(services)))


def _check_health_url(r: _Reader, key: str, value: str, app_port: int, backend_port: int) -> str:
    example = f"http://127.0.0.1:{backend_port}/latest"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.fail(key, f"'{value}' is not an http(s) URL; use e.g. {example}")
        return value
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        r.fail(key, f"host '{parts.hostname}' is not loopback; each node checks its own app, "
                    f"so use http://127.0.0.1:{backend_port}/PATH")
        return value
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if port == app_port:
        # The URL of stacks from before HAProxy: port 80 now reaches HAProxy, which answers from the
        # peer's app when the local one is down, so the check would no longer see the local app.
        r.fail(key, f"port {port} is HAProxy's public port (appPort) since HAProxy fronts the app; check the "
                    f"app itself on appBackendPort: {example}")
    elif port != backend_port:
        r.fail(key, f"port {port} is not appBackendPort ({backend_port}), where the app listens on the node; "
                    f"use {example}")
    return value


def image_registry(image: str) -> str:
    """The registry host of an image reference (Docker's rule: a first component with '.' or ':'
    or 'localhost' is a host; otherwise the image is on Docker Hub)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _check_app_image(r: _Reader, key: str, value: str) -> str:
    if "@" in value or ":" in value.rsplit("/", 1)[-1]:
        r.fail(key, f"'{value}' carries a tag or digest; give the repository only (e.g. {APP_IMAGE_PLACEHOLDER}): "
                    "the tag is the version the rollout deploys (MINITWIT_VERSION)")
    elif not _IMAGE_RE.match(value):
        r.fail(key, f"'{value}' is not an image name; use lower-case REGISTRY/PATH such as "
                    "ghcr.io/my-team/minitwit or registry.digitalocean.com/my-registry/minitwit")
    return value


def _read_registry(r: _Reader, app_image: str) -> Registry | None:
    """Registry login for a private image.

    The rule: a private registry is asked for when registryPassword is set, or when appImage lives
    on registryServer. Then registryServer, registryUsername and registryPassword are all required.
    registryServer/registryUsername alone, for an image on another registry, ask for nothing (no
    login happens), so a public image needs no secret beyond the required two."""
    server = r.string("registryServer")
    user = r.string("registryUsername")
    password = r.secret("registryPassword", required=False)
    if server and not _REGISTRY_RE.match(server):
        r.fail("registryServer", f"'{server}' is not a registry host; use e.g. registry.digitalocean.com or ghcr.io")
        return None
    on_server = bool(server) and image_registry(app_image) == server
    if not (password or on_server):
        return None
    why = ("registryPassword is set" if password else
           f"appImage {app_image} is on registryServer {server}, so the droplets must log in")
    for key, val in (("registryServer", server), ("registryUsername", user), ("registryPassword", password)):
        if not val:
            r.fail(key, f"is missing: {why}; a private registry needs registryServer, registryUsername and "
                        "registryPassword together (for a public image leave all three empty)")
    if server and user and password:
        return Registry(server=server, username=user, password=password)
    return None


_CHECK_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$")
# Ports the node uses itself: SSH, HAProxy's monitor and Prometheus exporter, node-exporter.
_RESERVED_PORTS = {22: "SSH", MONITOR_PORT: "HAProxy's monitor (keepalived's check)",
                   METRICS_PORT: "HAProxy's Prometheus exporter", NODE_EXPORTER_PORT: "node-exporter"}


def _check_backend_port(r: _Reader, key: str, app_port: int) -> int:
    port = r.integer(key, 1024, 65535)
    if not 1024 <= port <= 65535:
        return port
    if port == app_port:
        r.fail(key, f"{port} is appPort, where HAProxy listens; give the app its own port, e.g. 5000")
    elif port in _RESERVED_PORTS:
        r.fail(key, f"{port} is taken by {_RESERVED_PORTS[port]} on the nodes; use another port, e.g. 5000")
    return port


def _check_size(r: _Reader, key: str, size: str) -> str:
    if size and not _SIZE_RE.match(size):
        r.fail(key, f"'{size}' is not a droplet size slug; use e.g. s-1vcpu-2gb or s-2vcpu-4gb "
                    "(`doctl compute size list`)")
    return size


def _check_image(r: _Reader, key: str, image: str) -> str:
    if image and not (image in SUPPORTED_IMAGES or image.isdigit()):
        r.fail(key, f"'{image}' is not supported; use {', '.join(SUPPORTED_IMAGES)} "
                    "(keepalived 2.2.x, apt) or the numeric ID of your snapshot of one")
    return image


NODE_NAMES = ("primary", "standby")
_OVERRIDE_FIELDS = {"dropletSize": _check_size, "dropletImage": _check_image}
_OVERRIDE_EXAMPLE = "pulumi config set nodeOverrides '{\"standby\": {\"dropletSize\": \"s-2vcpu-4gb\"}}'"


def _read_node_overrides(r: _Reader, key: str) -> dict[str, NodeOverride]:
    """nodeOverrides: a JSON map of primary/standby to {dropletSize, dropletImage}, each optional."""
    raw = (r.raw(key) or "").strip()
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        r.fail(key, f"is not JSON; use a map of node to settings, e.g. `{_OVERRIDE_EXAMPLE}`")
        return {}
    if not isinstance(doc, dict):
        r.fail(key, f"must be a map of primary/standby to {{dropletSize, dropletImage}}, e.g. `{_OVERRIDE_EXAMPLE}`")
        return {}
    out: dict[str, NodeOverride] = {}
    for node, fields in doc.items():
        if node not in NODE_NAMES:
            r.fail(f"{key}.{node}", f"is not a node; use {' or '.join(NODE_NAMES)}")
            continue
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            r.fail(f"{key}.{node}", "must be a map with dropletSize and/or dropletImage (strings)")
            continue
        unknown = sorted(set(fields) - set(_OVERRIDE_FIELDS))
        if unknown:
            r.fail(f"{key}.{node}", f"{', '.join(unknown)} cannot be set per node; use dropletSize and/or dropletImage")
            continue
        values = {f: check(r, f"{key}.{node}.{f}", fields[f].strip()) for f, check in _OVERRIDE_FIELDS.items()
                  if f in fields}
        out[node] = NodeOverride(droplet_size=values.get("dropletSize", ""),
                                 droplet_image=values.get("dropletImage", ""))
    if len(out) == len(NODE_NAMES) and len(set(out.values())) == 1:
        # One `pulumi up` would then change both nodes: the full outage this key exists to avoid.
        r.fail(key, "gives both nodes the same override, so one `pulumi up` would resize or rebuild both at once; "
                    "override one node at a time (scripts/rollout.py resize|reimage does), then set "
                    "dropletSize/dropletImage and remove the overrides")
    return out


_VERSION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def unknown_keys(source: ConfigSource, schema: Mapping[str, ConfigKey]) -> list[Problem]:
    problems = []
    for key in list(source.keys()):
        if key in schema:
            continue
        close = difflib.get_close_matches(key, list(schema), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(sorted(schema))}"
        problems.append(Problem(key, f"is not a setting of this project{hint}"))
    return problems


def load_settings(source: ConfigSource, stack: str, project_dir: Path,
                  schema: Mapping[str, ConfigKey] | None = None) -> Settings:
    """Read and validate every setting; raise SettingsError with all problems found."""
    schema = schema if schema is not None else load_schema(project_dir / "Pulumi.yaml")
    r = _Reader(source, schema)
    r.problems.extend(unknown_keys(source, schema))

    region = r.string("region")
    if region and not _REGION_RE.match(region):
        r.fail("region", f"'{region}' is not a region slug; use one of {', '.join(KNOWN_REGIONS)}")
    elif region and region not in KNOWN_REGIONS:
        r.fail("region", f"'{region}' is not a DigitalOcean region we know; use one of {', '.join(KNOWN_REGIONS)}")

    vpc_ip_range = _check_vpc_range(r, "vpcIpRange", r.string("vpcIpRange"))

    size = _check_size(r, "dropletSize", r.string("dropletSize"))
    image = _check_image(r, "dropletImage", r.string("dropletImage"))
    overrides = _read_node_overrides(r, "nodeOverrides")

    iface = r.string("privateInterface")
    if not _IFACE_RE.match(iface) or iface == "lo":
        r.fail("privateInterface", f"'{iface}' is not a usable interface name; use the VPC interface, eth1 "
                                   "on DigitalOcean's images")

    pubkey = r.string("sshPublicKey")
    fingerprints = r.string_list("sshKeyFingerprints") or []
    if pubkey and not _PUBKEY_RE.match(pubkey):
        r.fail("sshPublicKey", "is not an OpenSSH public key; paste one line like 'ssh-ed25519 AAAA... you@host' "
                               "(the contents of ~/.ssh/id_ed25519.pub)")
    for i, fp in enumerate(fingerprints):
        if not _FINGERPRINT_RE.match(fp.lower()):
            r.fail(f"sshKeyFingerprints[{i}]", f"'{fp}' is not an MD5 fingerprint; use the aa:bb:...:ff form "
                                               "DigitalOcean shows (`doctl compute ssh-key list`)")
    if not pubkey and not fingerprints:
        r.fail("sshPublicKey", "neither sshPublicKey nor sshKeyFingerprints is set; set one so the `deploy` "
                               "user gets a key (`pulumi config set sshPublicKey \"$(cat ~/.ssh/id_ed25519.pub)\"`)")

    # No longer read: `pulumi up` provisions as `provision` with a key the stack generates, and the
    # rollout reads the deploy key from its own environment. A stack that still holds it is told
    # to drop it (program.py warns), so the deploy key stops travelling with every `up` job.
    stale_private_key = r.secret("sshPrivateKey", required=False) is not None

    admin_cidrs = _check_admin_cidrs(r, "adminCidrs", r.string_list("adminCidrs"))

    reserved_ip = r.string("reservedIp") or None
    if reserved_ip:
        try:
            addr = ipaddress.ip_address(reserved_ip)
            if addr.version != 4:
                r.fail("reservedIp", f"{addr} is IPv6; this stack adopts a reserved IPv4 address")
            elif _not_public(addr):
                r.fail("reservedIp", f"{addr} is not a public address; a reserved IP is public "
                                     "(`doctl compute reserved-ip list`), or leave it empty to create one")
        except ValueError:
            r.fail("reservedIp", f"'{reserved_ip}' is not an IPv4 address; use e.g. 203.0.113.10, "
                                 "or leave it empty to create one")

    takeover = r.boolean("reservedIpTakeover")
    if takeover and not reserved_ip:
        r.fail("reservedIpTakeover", "is true but reservedIp is empty; it only applies to an adopted reservedIp")

    app_port = r.integer("appPort", 1, 65535)
    if app_port == 22:
        r.fail("appPort", "22 is SSH's port, reserved for the admin CIDRs; publish the app on 80 or another port")
    backend_port = _check_backend_port(r, "appBackendPort", app_port)
    serve = r.string("serve")
    if serve not in SERVE_MODES:
        r.fail("serve", f"'{serve}' is not a serving mode; use active-standby (the local app, the peer's only "
                        "when it is down) or both (each node's HAProxy balances over both apps)")
    app_workers = r.integer("appWorkers", 0, MAX_APP_WORKERS)
    check_path = r.string("appCheckPath")
    if check_path and not _CHECK_PATH_RE.match(check_path):
        r.fail("appCheckPath", f"'{check_path}' is not an absolute URL path; use e.g. /healthz (a path that "
                               "needs no database), or leave it empty for TCP checks")
    compose = _check_compose(r, "composeFile", r.string("composeFile"), project_dir, backend_port)
    health_url = _check_health_url(r, "healthUrl", r.string("healthUrl"), app_port, backend_port)
    app_image = _check_app_image(r, "appImage", r.string("appImage"))
    app_version = r.string("appVersion")
    if app_version and not _VERSION_RE.match(app_version):
        r.fail("appVersion", f"'{app_version[:80]}' is not a docker tag; use the tag the rollout deployed "
                             "(letters, digits, _ . -; at most 128), or leave it empty for latest")
    registry = _read_registry(r, app_image)

    token = r.secret("failoverToken", required=True)
    if token and not _TOKEN_RE.match(token.reveal()):
        r.fail("failoverToken", "does not look like a DigitalOcean API token (dop_v1_ followed by 64 hex "
                                "digits); create a custom-scoped token with reserved_ip:update")

    webhook = r.secret("alertWebhookUrl", required=False)
    if webhook:
        parts = urlsplit(webhook.reveal())
        if parts.scheme != "https" or not parts.hostname:
            # Never echo the value: the URL is the credential.
            r.fail("alertWebhookUrl", "is not an https URL; use the Slack or Discord incoming-webhook URL "
                                      "(https://hooks.slack.com/services/... or https://discord.com/api/webhooks/...)"
                                      ", or leave it empty for no alerts")

    protect = r.boolean("protect")
    profile = r.string("failoverProfile")
    if profile not in PROFILES:
        r.fail("failoverProfile", f"'{profile}' is not a profile; use one of {', '.join(sorted(PROFILES))}")
    router_id = r.integer("vrrpRouterId", 1, 255)

    database = _read_database(r)
    if (database.mode == "managed" and database.sslmode in _DB_SSL_STRENGTH and compose.text
            and DB_CA_FILE not in compose.text):
        r.fail("composeFile", f"does not mount the database's CA, which the app needs to verify the managed "
                              f"cluster (databaseSslMode={database.sslmode}); add to the app's service: "
                              f'volumes: ["{DB_CA_FILE}:{DB_CA_FILE}:ro"]')

    if r.problems:
        raise SettingsError(r.problems, stack)
    assert token is not None  # noqa: S101 - guaranteed by r.problems
    return Settings(
        stack=stack, region=region, vpc_ip_range=vpc_ip_range, droplet_size=size, droplet_image=image,
        private_interface=iface, ssh_public_key=pubkey or None,
        ssh_key_fingerprints=tuple(fp.lower() for fp in fingerprints), stale_private_key=stale_private_key,
        admin_cidrs=admin_cidrs, reserved_ip=reserved_ip, compose=compose, health_url=health_url,
        app_port=app_port, app_backend_port=backend_port, serve=serve, app_check_path=check_path,
        app_workers=app_workers, registry=registry, failover_token=token, protect=protect,
        failover_profile=profile, vrrp_router_id=router_id, database=database, app_image=app_image,
        reserved_ip_takeover=takeover,
        alert_webhook_url=webhook or None,
        app_version=app_version, node_overrides=overrides,
    )


_DB_SIZE_RE = re.compile(r"^db-[a-z0-9]+(-[a-z0-9]+)+$")
# The managed cluster's CA on each node and, mounted at the same path, in the app's container
# (infra/database.py ships it; DATABASE_URL's sslrootcert names it).
DB_CA_FILE = "/etc/minitwit-ha/db-ca.crt"
# databaseSslMode: libpq's modes that check the server, plus `require` (encrypts, checks nothing),
# which is allowed only when asked for by name (the program then warns on every run).
DB_SSL_MODES = ("verify-full", "verify-ca", "require")
_DB_SSL_STRENGTH = {"verify-full": 2, "verify-ca": 1}


def uri_sslmode(uri: str) -> str | None:
    """The sslmode a PostgreSQL URI asks for (None: libpq's default, `prefer`)."""
    values = parse_qs(urlsplit(uri).query).get("sslmode")
    return values[-1] if values else None


def _read_database(r: _Reader) -> Database:
    mode = r.string("database")
    uri = r.secret("databaseUri", required=False)
    size = r.string("databaseSize")
    version = r.string("databaseVersion")
    nodes = r.integer("databaseNodeCount", 1, 3)
    sslmode = r.string("databaseSslMode")
    if sslmode not in DB_SSL_MODES:
        r.fail("databaseSslMode", f"'{sslmode}' is not a TLS mode; use verify-full (checks the CA and the host "
                                  "name), verify-ca (the CA only) or, to accept any certificate, require")
    if mode not in ("managed", "external", "none"):
        r.fail("database", f"'{mode}' is not a database mode; use managed, external or none")
        return Database(mode="none")
    if mode == "external":
        if not uri:
            r.fail("databaseUri", "is required with database=external: "
                                  "`pulumi config set --secret databaseUri postgresql://user:pass@host:5432/db`")
        elif not uri.reveal().startswith(("postgresql://", "postgres://")):
            r.fail("databaseUri", "is not a PostgreSQL URI; use postgresql://USER:PASSWORD@HOST:PORT/DB")
        elif sslmode in _DB_SSL_STRENGTH:
            # Never echo the URI: it holds the password. Only its sslmode is named.
            got = uri_sslmode(uri.reveal())
            if _DB_SSL_STRENGTH.get(got or "", 0) < _DB_SSL_STRENGTH[sslmode]:
                r.fail("databaseUri", f"asks for sslmode={got or 'prefer (the default)'}, which does not verify the "
                                      f"server as databaseSslMode={sslmode} requires; add "
                                      f"?sslmode={sslmode}&sslrootcert=/PATH/TO/CA (or sslrootcert=system on "
                                      "libpq 16+), or set databaseSslMode require to accept any certificate")
    elif uri:
        r.fail("databaseUri", f"is set but database={mode} ignores it; unset it or use database=external")
    if mode == "managed":
        if not _DB_SIZE_RE.match(size):
            r.fail("databaseSize", f"'{size}' is not a database size slug; use e.g. db-s-1vcpu-1gb")
        if not version.isdigit() or not 13 <= int(version) <= 17:
            r.fail("databaseVersion", f"'{version}' is not a supported PostgreSQL major version; use 13 to 17")
        ram = _DB_SIZE_RAM_RE.search(size)
        if nodes >= 2 and ram and int(ram.group(1)) < STANDBY_MIN_RAM_GB:
            r.fail("databaseNodeCount", f"{nodes} nodes need a databaseSize with at least {STANDBY_MIN_RAM_GB} GB "
                                        f"of RAM ({size} has {ram.group(1)} GB; DigitalOcean runs standby nodes "
                                        "only on 2 GB plans and up): use db-s-1vcpu-2gb or set databaseNodeCount 1")
    return Database(mode=mode, uri=uri, size=size, version=version, node_count=nodes, sslmode=sslmode)
