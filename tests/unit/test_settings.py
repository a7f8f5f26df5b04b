"""Settings: every bad input is refused with a message naming the key and what would be valid."""

from __future__ import annotations

import pytest

from infra.schema import load_schema
from infra.settings import DictSource, Secret, SettingsError, load_settings
from tests.conftest import ROOT, SECRET_KEYS, SENTINEL_PRIVATE_KEY, SENTINEL_TOKEN, base_config


def load(cfg: dict, secret_keys=SECRET_KEYS, stack: str = "test"):
    return load_settings(DictSource(cfg, frozenset(k for k in secret_keys if k in cfg)), stack=stack,
                         project_dir=ROOT)


def problems_for(cfg: dict, secret_keys=SECRET_KEYS) -> str:
    with pytest.raises(SettingsError) as err:
        load(cfg, secret_keys)
    return str(err.value)


def test_valid_config_loads_with_schema_defaults():
    s = load(base_config())
    assert s.region == "fra1" and s.droplet_image == "debian-12-x64" and s.droplet_size == "s-1vcpu-2gb"
    assert s.admin_cidrs == ("198.51.100.0/24",)
    assert s.reserved_ip is None and s.protect is False and s.failover_profile == "fast"
    assert s.compose.services == ("minitwit",)
    assert s.http_ports == (80, 443) and s.health_path == "/latest"
    assert s.vrrp_router_id == 51


def test_secrets_are_wrapped_and_never_print():
    s = load(base_config())
    assert isinstance(s.failover_token, Secret) and s.failover_token.reveal() == SENTINEL_TOKEN
    assert SENTINEL_TOKEN not in repr(s) and SENTINEL_TOKEN not in str(s)
    assert "SENTINEL-PRIVATE-KEY" not in repr(s)


# (config overrides, the key the message must name, a fragment of the advice)
BAD_INPUTS = [
    ({"region": "frankfurt"}, "minitwit-ha:region", "use one of"),
    ({"region": "xyz9"}, "minitwit-ha:region", "fra1"),
    ({"vpcIpRange": "10.110.16.0/33"}, "minitwit-ha:vpcIpRange", "not a valid network"),
    ({"vpcIpRange": "10.110.16.5/24"}, "minitwit-ha:vpcIpRange", "did you mean 10.110.16.0/24"),
    ({"vpcIpRange": "8.8.8.0/24"}, "minitwit-ha:vpcIpRange", "not a private range"),
    ({"vpcIpRange": "10.0.0.0/8"}, "minitwit-ha:vpcIpRange", "/16 to /28"),
    ({"vpcIpRange": "10.244.0.0/24"}, "minitwit-ha:vpcIpRange", "reserved by DigitalOcean"),
    ({"vpcIpRange": "172.17.5.0/24"}, "minitwit-ha:vpcIpRange", "Docker"),
    ({"adminCidrs": []}, "minitwit-ha:adminCidrs", "at least one CIDR"),
    ({"adminCidrs": None}, "minitwit-ha:adminCidrs", "is required"),
    ({"adminCidrs": ["not-a-cidr"]}, "minitwit-ha:adminCidrs[0]", "not a valid CIDR"),
    ({"adminCidrs": ["198.51.100.7/24"]}, "minitwit-ha:adminCidrs[0]", "did you mean 198.51.100.0/24"),
    ({"adminCidrs": ["0.0.0.0/0"]}, "minitwit-ha:adminCidrs[0]", "whole internet"),
    ({"adminCidrs": "198.51.100.0/24"}, "minitwit-ha:adminCidrs", "list of strings"),
    ({"reservedIp": "203.0.113"}, "minitwit-ha:reservedIp", "not an IPv4 address"),
    ({"reservedIp": "10.1.2.3"}, "minitwit-ha:reservedIp", "not a public address"),
    ({"reservedIp": "2001:db8::1"}, "minitwit-ha:reservedIp", "IPv6"),
    ({"composeFile": "deploy/missing.yaml"}, "minitwit-ha:composeFile", "does not exist"),
    ({"dropletSize": "huge"}, "minitwit-ha:dropletSize", "s-1vcpu-2gb"),
    ({"dropletImage": "centos-7-x64"}, "minitwit-ha:dropletImage", "debian-12-x64"),
    ({"dropletImage": "debian-11-x64"}, "minitwit-ha:dropletImage", "keepalived 2.2.x"),
    ({"privateInterface": "lo"}, "minitwit-ha:privateInterface", "eth1"),
    ({"sshPublicKey": "", "sshKeyFingerprints": []}, "minitwit-ha:sshPublicKey", "neither sshPublicKey"),
    ({"sshPublicKey": "AAAA-not-a-key"}, "minitwit-ha:sshPublicKey", "not an OpenSSH public key"),
    ({"sshKeyFingerprints": ["SHA256:abc"]}, "minitwit-ha:sshKeyFingerprints[0]", "MD5 fingerprint"),
    ({"failoverToken": None}, "minitwit-ha:failoverToken", "is required and secret"),
    ({"failoverToken": "not-a-token"}, "minitwit-ha:failoverToken", "reserved_ip:update"),
    ({"healthUrl": "ftp://127.0.0.1/x"}, "minitwit-ha:healthUrl", "http(s) URL"),
    ({"healthUrl": "http://203.0.113.10/latest"}, "minitwit-ha:healthUrl", "not loopback"),
    ({"appPort": "eighty"}, "minitwit-ha:appPort", "not an integer"),
    ({"appPort": 70000}, "minitwit-ha:appPort", "1 to 65535"),
    ({"appPort": 22}, "minitwit-ha:appPort", "SSH"),
    ({"registryPassword": "pw-1"}, "minitwit-ha:registryServer", "registryPassword is set"),
    ({"registryPassword": "pw-1"}, "minitwit-ha:registryUsername", "registryPassword is set"),
    ({"registryServer": "registry.digitalocean.com", "registryUsername": "ci",
      "appImage": "registry.digitalocean.com/team/minitwit"}, "minitwit-ha:registryPassword",
     "appImage registry.digitalocean.com/team/minitwit is on registryServer"),
    ({"appImage": "ghcr.io/team/minitwit:v1"}, "minitwit-ha:appImage", "tag or digest"),
    ({"appImage": "ghcr.io/Team/MiniTwit"}, "minitwit-ha:appImage", "not an image name"),
    ({"database": "managed", "databaseNodeCount": 2}, "minitwit-ha:databaseNodeCount", "at least 2 GB"),
    ({"database": "managed", "databaseNodeCount": 3, "databaseSize": "db-amd-1vcpu-1gb"},
     "minitwit-ha:databaseNodeCount", "db-s-1vcpu-2gb"),
    ({"reservedIpTakeover": True}, "minitwit-ha:reservedIpTakeover", "reservedIp is empty"),
    ({"healthUrl": "http://127.0.0.1:80/latest"}, "minitwit-ha:healthUrl", "HAProxy's public port"),
    ({"healthUrl": "http://127.0.0.1:6000/latest"}, "minitwit-ha:healthUrl", "not appBackendPort (5000)"),
    ({"appBackendPort": 80}, "minitwit-ha:appBackendPort", "1024 to 65535"),
    ({"appBackendPort": "five"}, "minitwit-ha:appBackendPort", "not an integer"),
    ({"appPort": 5000}, "minitwit-ha:appBackendPort", "is appPort"),
    ({"appBackendPort": 8404}, "minitwit-ha:appBackendPort", "HAProxy's monitor"),
    ({"appBackendPort": 8405}, "minitwit-ha:appBackendPort", "Prometheus exporter"),
    ({"appBackendPort": 9100}, "minitwit-ha:appBackendPort", "node-exporter"),
    ({"serve": "hot-hot"}, "minitwit-ha:serve", "active-standby"),
    ({"appCheckPath": "healthz"}, "minitwit-ha:appCheckPath", "absolute URL path"),
    ({"registryServer": "https://ghcr.io"}, "minitwit-ha:registryServer", "registry host"),
    ({"protect": "yes"}, "minitwit-ha:protect", "true or false"),
    ({"failoverProfile": "turbo"}, "minitwit-ha:failoverProfile", "fast, tutorial"),
    ({"vrrpRouterId": 0}, "minitwit-ha:vrrpRouterId", "1 to 255"),
    ({"database": "sqlite"}, "minitwit-ha:database", "managed, external or none"),
    ({"database": "external"}, "minitwit-ha:databaseUri", "required with database=external"),
    ({"databaseNodeCount": 5}, "minitwit-ha:databaseNodeCount", "1 to 3"),
    ({"databaseSslMode": "disable"}, "minitwit-ha:databaseSslMode", "verify-full (checks the CA and the host name)"),
    # external: the URI must verify at least as strictly as databaseSslMode asks (default verify-full).
    ({"database": "external", "databaseUri": "postgresql://u:p@db.example:5432/app"},
     "minitwit-ha:databaseUri", "sslmode=prefer (the default), which does not verify"),
    ({"database": "external", "databaseUri": "postgresql://u:p@db.example:5432/app?sslmode=require"},
     "minitwit-ha:databaseUri", "sslmode=require, which does not verify the server as databaseSslMode=verify-full"),
    ({"database": "external", "databaseUri": "postgresql://u:p@db.example:5432/app?sslmode=verify-ca",
      "databaseSslMode": "verify-full"}, "minitwit-ha:databaseUri", "add ?sslmode=verify-full&sslrootcert="),
    ({"regoin": "fra1"}, "minitwit-ha:regoin", "did you mean region"),
    ({"nodeOverrides": "standby=s-2vcpu-4gb"}, "minitwit-ha:nodeOverrides", "is not JSON"),
    ({"nodeOverrides": {"backup": {"dropletSize": "s-2vcpu-4gb"}}}, "minitwit-ha:nodeOverrides.backup",
     "use primary or standby"),
    ({"nodeOverrides": {"standby": {"dropletSize": "huge"}}}, "minitwit-ha:nodeOverrides.standby.dropletSize",
     "not a droplet size slug"),
    ({"nodeOverrides": {"standby": {"dropletImage": "centos-7"}}}, "minitwit-ha:nodeOverrides.standby.dropletImage",
     "debian-12-x64"),
    ({"nodeOverrides": {"standby": {"region": "ams3"}}}, "minitwit-ha:nodeOverrides.standby",
     "region cannot be set per node"),
    ({"nodeOverrides": {n: {"dropletSize": "s-2vcpu-4gb"} for n in ("primary", "standby")}},
     "minitwit-ha:nodeOverrides", "one node at a time"),
    ({"appVersion": "v1 beta"}, "minitwit-ha:appVersion", "not a docker tag"),
]


@pytest.mark.parametrize("overrides,key,advice", BAD_INPUTS, ids=[f"{b[1]}:{b[2]}" for b in BAD_INPUTS])
def test_bad_input_is_refused_naming_key_and_fix(overrides, key, advice):
    cfg = base_config()
    for k, v in overrides.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    message = problems_for(cfg)
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(f"- {key}:")), None)
    assert line is not None, f"no line for {key} in:\n{message}"
    assert advice in line, line
    assert SENTINEL_TOKEN not in message and "SENTINEL-PRIVATE-KEY" not in message


def test_at_least_fifteen_distinct_keys_are_checked():
    assert len({b[1] for b in BAD_INPUTS}) >= 15


def test_compose_file_without_services_or_images(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("version: '3'\n")
    assert "has no services" in problems_for(base_config(composeFile=str(empty)))
    built = tmp_path / "build.yaml"
    built.write_text("services:\n  web:\n    build: .\n")
    assert "service 'web'" in problems_for(base_config(composeFile=str(built)))
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [unclosed\n")
    assert "not valid YAML" in problems_for(base_config(composeFile=str(broken)))


def _compose(tmp_path, ports: str) -> str:
    path = tmp_path / "compose.yaml"
    path.write_text(f"services:\n  web:\n    image: example/web:1\n    ports: {ports}\n")
    return str(path)


LOOPBACK = '"127.0.0.1:${MTHA_APP_BACKEND_PORT}:5000"'
VPC = '"${MTHA_PRIVATE_IPV4}:${MTHA_APP_BACKEND_PORT}:5000"'


@pytest.mark.parametrize("ports,advice", [
    (f'["80:5000", {LOOPBACK}, {VPC}]', "publishes '80:5000' without a host IP"),
    (f'["5000", {LOOPBACK}, {VPC}]', "publishes '5000' without a host IP"),
    (f'["0.0.0.0:5000:5000", {LOOPBACK}, {VPC}]', "on 0.0.0.0"),
    (f'["[::]:5000:5000", {LOOPBACK}, {VPC}]', "on ::"),
    (f'[{{"target": 5000, "published": 8080}}, {LOOPBACK}, {VPC}]', "without a host IP"),
    (f"[{LOOPBACK}]", "on ${MTHA_PRIVATE_IPV4}"),
    (f"[{VPC}]", "on 127.0.0.1"),
    ('["127.0.0.1:6000:5000", "${MTHA_PRIVATE_IPV4}:6000:5000"]', "appBackendPort (5000)"),
])
def test_compose_publishing_beyond_loopback_and_the_vpc_is_refused(tmp_path, ports, advice):
    message = problems_for(base_config(composeFile=_compose(tmp_path, ports)))
    line = next(ln for ln in message.splitlines() if "minitwit-ha:composeFile:" in ln and advice in ln)
    assert "127.0.0.1" in line  # says how to publish instead


@pytest.mark.parametrize("ports", [
    f"[{LOOPBACK}, {VPC}]",
    '["127.0.0.1:5000:5000", "${MTHA_PRIVATE_IPV4:?set by the stack}:5000:5000/tcp"]',
    '[{"target": 5000, "published": "5000", "host_ip": "127.0.0.1"}, '
    '{"target": 5000, "published": "${MTHA_APP_BACKEND_PORT}", "host_ip": "${MTHA_PRIVATE_IPV4}"}]',
])
def test_compose_publishing_on_loopback_and_the_vpc_address_loads(tmp_path, ports):
    assert load(base_config(composeFile=_compose(tmp_path, ports))).compose.services == ("web",)


def test_host_networking_is_refused(tmp_path):
    path = tmp_path / "compose.yaml"
    path.write_text(f"services:\n  web:\n    image: example/web:1\n    network_mode: host\n"
                    f"  app:\n    image: example/app:1\n    ports: [{LOOPBACK}, {VPC}]\n")
    assert "network_mode: host" in problems_for(base_config(composeFile=str(path)))


def test_haproxy_settings_have_defaults_and_load():
    s = load(base_config())
    assert (s.app_backend_port, s.serve, s.app_check_path) == (5000, "active-standby", "")
    s = load(base_config(appBackendPort=6000, healthUrl="http://127.0.0.1:6000/latest", serve="both",
                         appCheckPath="/healthz", composeFile="deploy/compose.yaml"))
    assert (s.app_backend_port, s.serve, s.app_check_path) == (6000, "both", "/healthz")


def test_plaintext_secret_is_refused_without_echoing_it():
    message = problems_for(base_config(), secret_keys=frozenset({"sshPrivateKey"}))
    assert "minitwit-ha:failoverToken: was set in plaintext" in message
    assert SENTINEL_TOKEN not in message


def test_all_problems_are_reported_at_once():
    message = problems_for(base_config(region="mars1", vpcIpRange="8.8.8.0/24", adminCidrs=[]))
    assert message.startswith("3 configuration problem(s) in stack 'test'; nothing was created")
    for key in ("region", "vpcIpRange", "adminCidrs"):
        assert f"minitwit-ha:{key}:" in message


def test_fingerprints_alone_are_enough():
    s = load(base_config(sshPublicKey="", sshKeyFingerprints=["3B:16:BF:E4:8B:00:8B:B8:59:8C:A9:D3:F0:19:45:FA"]))
    assert s.ssh_public_key is None
    assert s.ssh_key_fingerprints == ("3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:fa",)


def test_registry_needs_all_three_and_keeps_password_secret():
    s = load(base_config(registryServer="registry.digitalocean.com", registryUsername="ci",
                         registryPassword="pw-123"))
    assert s.registry is not None and s.registry.password.reveal() == "pw-123"
    assert "pw-123" not in repr(s)


def test_schema_uses_only_what_pulumi_accepts_and_every_key_is_read():
    schema = load_schema(ROOT / "Pulumi.yaml")
    assert set(schema) >= {"region", "vpcIpRange", "dropletSize", "dropletImage", "sshPublicKey",
                           "sshKeyFingerprints", "sshPrivateKey", "adminCidrs", "reservedIp", "composeFile",
                           "healthUrl", "registryUsername", "registryPassword", "failoverToken", "protect"}
    for key in schema.values():
        assert key.description, f"{key.name} has no description"
    assert schema["failoverToken"].secret
    # A required secret has no default (Pulumi refuses a plaintext default on a secret key); an
    # optional one has `default: ""` and no secret flag, or Pulumi itself would demand it on every stack.
    assert schema["failoverToken"].default is None
    assert schema["sshPrivateKey"].default == "" and not schema["sshPrivateKey"].secret
    assert "Unused" in schema["sshPrivateKey"].description
    # Every key with a default loads when unset; a wrong type in a default would fail here.
    load(base_config())


def test_the_deploy_key_is_not_asked_for_and_a_stale_one_is_flagged(monkeypatch):
    # `pulumi up` provisions with a key the stack generates: the deploy key's private half has no
    # business in the stack's config. A stack that still holds it loads (whatever it holds) and warns.
    from infra import program

    assert load(base_config()).stale_private_key is False
    for stale in (SENTINEL_PRIVATE_KEY, "ssh-ed25519 AAAA left over"):
        s = load(base_config(sshPrivateKey=stale))
        assert s.stale_private_key is True and stale not in repr(s)
    warned: list[str] = []
    monkeypatch.setattr(program.pulumi.log, "warn", lambda msg, *a, **k: warned.append(msg))
    monkeypatch.setattr(program, "HaPair", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        program.build(load(base_config(sshPrivateKey=SENTINEL_PRIVATE_KEY)))
    assert warned == [program.STALE_PRIVATE_KEY_WARNING]
    assert "pulumi config rm sshPrivateKey" in warned[0] and SENTINEL_PRIVATE_KEY not in warned[0]


def test_registry_keys_without_a_password_ask_for_nothing_when_the_image_is_elsewhere():
    # A public image: registryServer/registryUsername left over from a template make no login and
    # demand no secret (the rule: a private registry is asked for by a password or by appImage's host).
    s = load(base_config(registryServer="registry.digitalocean.com", registryUsername="ci",
                         appImage="ghcr.io/team/minitwit"))
    assert s.registry is None and s.app_image == "ghcr.io/team/minitwit"


def test_docker_hub_and_registry_hosts_are_told_apart():
    from infra.settings import image_registry

    assert image_registry("team/minitwit") == "docker.io"
    assert image_registry("minitwit") == "docker.io"
    assert image_registry("ghcr.io/team/minitwit") == "ghcr.io"
    assert image_registry("localhost:5000/minitwit") == "localhost:5000"


def test_a_standby_database_node_on_a_2gb_plan_is_fine():
    s = load(base_config(database="managed", databaseNodeCount=2, databaseSize="db-s-1vcpu-2gb"))
    assert s.database.node_count == 2


@pytest.mark.parametrize("stack", ["prod", "staging"])
def test_the_stack_files_pass_with_only_the_one_required_secret(stack):
    # A newcomer's first `pulumi up`: the stack file as committed, plus failoverToken.
    import yaml

    config = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    values = {k.split(":", 1)[1]: v for k, v in config.items()}
    values |= {"failoverToken": SENTINEL_TOKEN}
    s = load(values, secret_keys=frozenset({"failoverToken"}), stack=stack)
    assert s.registry is None and s.database.mode == "managed" and not s.stale_private_key


def test_alert_webhook_url_is_an_optional_https_secret():
    assert load(base_config()).alert_webhook_url is None
    url = "https://discord.com/api/webhooks/1/SENTINEL-hook"
    s = load(base_config(alertWebhookUrl=url))
    assert isinstance(s.alert_webhook_url, Secret) and s.alert_webhook_url.reveal() == url
    with pytest.raises(SettingsError) as e:
        load(base_config(alertWebhookUrl="http://hooks.example/SENTINEL-hook"))
    assert "minitwit-ha:alertWebhookUrl" in str(e.value) and "is not an https URL" in str(e.value)
    assert "SENTINEL-hook" not in str(e.value)  # the URL is the credential: never echoed
    with pytest.raises(SettingsError) as e:
        load(base_config(alertWebhookUrl=url), secret_keys=frozenset({"sshPrivateKey", "failoverToken"}))
    assert "was set in plaintext" in str(e.value) and "SENTINEL-hook" not in str(e.value)


def test_node_overrides_apply_to_one_node_and_say_which_is_rebuilt():
    s = load_settings(DictSource(base_config(nodeOverrides={"standby": {"dropletSize": "s-2vcpu-4gb",
                                                                        "dropletImage": "ubuntu-24-04-x64"}}),
                                 SECRET_KEYS), stack="test", project_dir=ROOT)
    assert (s.node_size("standby"), s.node_image("standby")) == ("s-2vcpu-4gb", "ubuntu-24-04-x64")
    assert (s.node_size("primary"), s.node_image("primary")) == ("s-1vcpu-2gb", "debian-12-x64")
    assert s.rebuilds("standby") and not s.rebuilds("primary")
    # A size alone resizes in place: no rebuild.
    size_only = load_settings(DictSource(base_config(nodeOverrides='{"primary": {"dropletSize": "s-2vcpu-4gb"}}'),
                                         SECRET_KEYS), stack="test", project_dir=ROOT)
    assert size_only.node_size("primary") == "s-2vcpu-4gb" and not size_only.rebuilds("primary")
    # Empty (the default) and an app version.
    plain = load_settings(DictSource(base_config(appVersion="2024.06.1"), SECRET_KEYS), stack="test", project_dir=ROOT)
    assert plain.node_overrides == {} and plain.app_version == "2024.06.1"


@pytest.mark.parametrize("uri_mode,setting", [("verify-full", "verify-full"), ("verify-full", "verify-ca"),
                                              ("verify-ca", "verify-ca"), ("require", "require"),
                                              (None, "require")])
def test_external_uri_tls_at_least_as_strict_as_the_setting_loads(uri_mode, setting):
    uri = "postgresql://u:SECRET-pw@db.example:5432/app" + (f"?sslmode={uri_mode}" if uri_mode else "")
    s = load(base_config(database="external", databaseUri=uri, databaseSslMode=setting))
    assert s.database.sslmode == setting and s.database.uri.reveal() == uri


def test_a_refused_external_uri_is_never_echoed():
    message = problems_for(base_config(database="external", databaseUri="postgresql://u:SECRET-pw@db.example/app"))
    assert "SECRET-pw" not in message and "db.example" not in message


def test_database_tls_defaults_to_verify_full():
    assert load(base_config(database="managed")).database.sslmode == "verify-full"


def test_managed_database_needs_the_compose_file_to_mount_its_ca(tmp_path):
    compose = tmp_path / "compose.yaml"
    compose.write_text((ROOT / "deploy" / "compose.yaml").read_text().replace(
        "      - /etc/minitwit-ha/db-ca.crt:/etc/minitwit-ha/db-ca.crt:ro\n", ""))
    message = problems_for(base_config(database="managed", composeFile=str(compose)))
    assert "minitwit-ha:composeFile: does not mount the database's CA" in message
    assert 'volumes: ["/etc/minitwit-ha/db-ca.crt:/etc/minitwit-ha/db-ca.crt:ro"]' in message
    # Nothing to verify, nothing to mount: database=none, or TLS explicitly unverified.
    load(base_config(database="none", composeFile=str(compose)))
    load(base_config(database="managed", databaseSslMode="require", composeFile=str(compose)))
