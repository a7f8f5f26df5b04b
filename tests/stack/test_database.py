"""The `database` setting under mocks: one shared PostgreSQL, its firewall, and where the URI goes."""

from __future__ import annotations

import logging

import pytest

from infra.database import DB_CA_FILE, NONE_WARNING
from infra.offline import DoMocks, unwrap
from tests.conftest import SENTINEL_DB_URI, base_config, run_stack

CLUSTER = "digitalocean:index/databaseCluster:DatabaseCluster"
FIREWALL = "digitalocean:index/databaseFirewall:DatabaseFirewall"
DB = "digitalocean:index/databaseDb:DatabaseDb"
USER = "digitalocean:index/databaseUser:DatabaseUser"
MOCK_USER_PASSWORD = "mock-user-password"  # what DoMocks gives a DatabaseUser


def test_managed_declares_cluster_database_user_and_firewall_in_the_vpc():
    run = run_stack(base_config(database="managed", databaseNodeCount=2, databaseSize="db-s-1vcpu-2gb", protect=True))
    clusters = run.mocks.of_type(CLUSTER)
    assert len(clusters) == 1
    c = clusters[0]
    assert c.plain("engine") == "pg" and c.plain("version") == "16" and c.plain("nodeCount") == 2
    assert c.plain("region") == "fra1"
    assert c.plain("privateNetworkUuid") == "c0ffee00-0000-4000-8000-000000000001"  # the pair's VPC
    assert [r.plain("name") for r in run.mocks.of_type(DB)] == ["minitwit"]
    assert [r.plain("name") for r in run.mocks.of_type(USER)] == ["minitwit"]
    assert run.outputs["database_host"].value == "private-db.example.invalid"


def test_database_firewall_trusts_the_stacks_tag_which_only_its_droplets_carry():
    run = run_stack(base_config(database="managed"))
    fw = run.mocks.of_type(FIREWALL)
    assert len(fw) == 1
    # One rule, a tag derived from the stack: a replacement droplet never changes the firewall.
    assert fw[0].plain("rules") == [{"type": "tag", "value": "minitwit-ha-test"}]
    droplets = run.mocks.of_type("digitalocean:index/droplet:Droplet")
    assert len(droplets) == 2 and all("minitwit-ha-test" in d.plain("tags") for d in droplets)
    others = [r for r in run.resources if r.typ != "digitalocean:index/droplet:Droplet" and
              "minitwit-ha-test" in (r.plain("tags") or [])]
    assert others == []  # the cluster carries its own tags, not the one its firewall trusts
    # Created after the droplets (the tag exists once one carries it), without their IDs as inputs.
    deps = {getattr(d, "_name", None) for d in run.mocks.options["minitwit-test-db-firewall"].depends_on}
    assert deps == {"minitwit-test-primary", "minitwit-test-standby"}
    # Another stack, another tag: staging's droplets never reach prod's database.
    other = run_stack(base_config(database="managed"), stack="staging")
    assert other.mocks.of_type(FIREWALL)[0].plain("rules") == [{"type": "tag", "value": "minitwit-ha-staging"}]


def test_managed_uri_is_secret_everywhere_and_reaches_each_node_as_0600_env():
    run = run_stack(base_config(database="managed"))
    envs = [r for r in run.commands() if r.name.endswith("-app-env")]
    assert len(envs) == 2
    for r in envs:
        assert r.is_secret("stdin")
        text = unwrap(r.inputs["stdin"])
        # Verified TLS: the cluster's CA (shipped to the node) and its host name.
        assert "DATABASE_URL=postgresql://minitwit:mock-user-password@private-db.example.invalid:25060/minitwit" \
               f"?sslmode=verify-full&sslrootcert={DB_CA_FILE}\n" in text
        assert "install -m 0600 -o root -g root /dev/stdin /srv/minitwit/app.env" in r.plain("create")
    for r in run.commands():
        for key in ("create", "update", "delete", "environment", "triggers"):
            assert MOCK_USER_PASSWORD not in repr(r.plain(key) if key != "triggers" else r.inputs.get(key, ""))
    for key, out in run.outputs.items():
        assert out.secret or MOCK_USER_PASSWORD not in repr(out.value), key


def test_external_uri_is_secret_and_only_its_host_is_an_output():
    run = run_stack(base_config(database="external", databaseUri=SENTINEL_DB_URI))
    assert not run.mocks.of_type(CLUSTER)
    assert run.outputs["database_host"].value == "db.internal.example"
    assert not run.outputs["database_host"].secret
    for r in run.commands():
        if r.name.endswith("-app-env"):
            assert r.is_secret("stdin") and SENTINEL_DB_URI in unwrap(r.inputs["stdin"])
        for key in ("create", "update", "delete", "environment"):
            assert "SENTINEL-db-password" not in repr(r.plain(key))
    for out in run.outputs.values():
        assert out.secret or "SENTINEL-db-password" not in repr(out.value)
    assert run.outputs["database_uri"].value == SENTINEL_DB_URI and run.outputs["database_uri"].secret
    assert not [r for r in run.commands() if r.name.endswith("-db-grants")]  # an external database's rights are its owner's


def test_none_declares_no_cluster_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        run = run_stack(base_config(database="none"))
    assert not run.mocks.of_type(CLUSTER) and not run.mocks.of_type(FIREWALL)
    assert NONE_WARNING in caplog.text
    assert run.outputs["database_host"].value == ""


@pytest.mark.parametrize("mode", ["managed", "external"])
def test_shared_modes_do_not_warn(caplog, mode):
    cfg = base_config(database=mode, databaseUri=SENTINEL_DB_URI if mode == "external" else None)
    with caplog.at_level(logging.WARNING):
        run_stack(cfg, mocks=DoMocks())
    assert NONE_WARNING not in caplog.text


def test_managed_grants_the_app_user_its_rights_from_the_first_node_before_any_app_starts():
    run = run_stack(base_config(database="managed"))
    grants = [r for r in run.commands() if r.name.endswith("-db-grants")]
    assert [r.name for r in grants] == ["minitwit-test-standby-db-grants"]  # one node: no concurrent GRANTs
    g = grants[0]
    create = g.plain("create")
    assert ("host=private-db.example.invalid port=25060 user=doadmin dbname=minitwit sslmode=verify-full "
            f"sslrootcert={DB_CA_FILE} ") in create
    # doadmin's password only on stdin, as a secret; never in the command, triggers or outputs.
    assert g.is_secret("stdin")
    stdin = unwrap(g.inputs["stdin"])
    assert stdin.startswith("mock-admin-password\n")
    assert 'GRANT USAGE, CREATE ON SCHEMA public TO "minitwit"' in stdin
    assert "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT" in stdin
    for r in run.commands():
        for key in ("create", "update", "delete", "environment", "triggers"):
            assert "mock-admin-password" not in repr(r.plain(key) if key != "triggers" else r.inputs.get(key, ""))
    for out in run.outputs.values():
        assert out.secret or "mock-admin-password" not in repr(out.value)
    # Both apps start after the grants (the standby's directly, the primary's after the standby's).
    standby_app = run.mocks.options["minitwit-test-standby-app"].depends_on
    assert any(getattr(d, "_name", None) == "minitwit-test-standby-db-grants" for d in standby_app)


def test_database_uri_output_is_the_app_user_on_the_public_host_and_secret():
    run = run_stack(base_config(database="managed"))
    out = run.outputs["database_uri"]
    assert out.secret
    assert out.value == "postgresql://minitwit:mock-user-password@db.example.invalid:25060/minitwit?sslmode=require"


def _depends_on(run, name: str) -> set[str]:
    return {getattr(d, "_name", None) for d in run.mocks.options[name].depends_on}


def test_managed_ships_the_clusters_ca_to_each_node_before_the_grants_and_the_app():
    run = run_stack(base_config(database="managed"), mocks=DoMocks(database_ca="-----BEGIN CERTIFICATE-----\nCA-91\n"))
    cas = {r.name: r for r in run.commands() if r.name.endswith("-db-ca")}
    assert sorted(cas) == ["minitwit-test-primary-db-ca", "minitwit-test-standby-db-ca"]
    for name, r in cas.items():
        assert unwrap(r.inputs["stdin"]) == "-----BEGIN CERTIFICATE-----\nCA-91\n"
        # Public data, readable by the app's container user: 0644, root-owned.
        assert f"install -m 0644 -o root -g root /dev/stdin {DB_CA_FILE}" in r.plain("create")
        node = name.removesuffix("-db-ca")
        assert name in _depends_on(run, f"{node}-app")
    assert "minitwit-test-standby-db-ca" in _depends_on(run, "minitwit-test-standby-db-grants")


def test_without_a_managed_cluster_the_ca_file_is_still_written_empty():
    """The compose file mounts the CA; a missing file would make Docker create a directory there."""
    run = run_stack(base_config(database="none"))
    cas = [r for r in run.commands() if r.name.endswith("-db-ca")]
    assert len(cas) == 2 and all(unwrap(r.inputs["stdin"]) == "" for r in cas)


def test_verify_ca_mode_reaches_the_uri_and_the_grants():
    run = run_stack(base_config(database="managed", databaseSslMode="verify-ca"))
    env = unwrap(next(r for r in run.commands() if r.name.endswith("-app-env")).inputs["stdin"])
    assert f"?sslmode=verify-ca&sslrootcert={DB_CA_FILE}\n" in env
    grants = next(r for r in run.commands() if r.name.endswith("-db-grants"))
    assert f"sslmode=verify-ca sslrootcert={DB_CA_FILE} " in grants.plain("create")


@pytest.mark.parametrize("mode", ["managed", "external"])
def test_require_mode_encrypts_without_checking_and_warns(caplog, mode):
    uri = "postgresql://app:pw@db.internal.example:5432/minitwit?sslmode=require"
    cfg = base_config(database=mode, databaseSslMode="require", databaseUri=uri if mode == "external" else None)
    with caplog.at_level(logging.WARNING):
        run = run_stack(cfg)
    assert "databaseSslMode=require" in caplog.text and "does not check" in caplog.text
    env = unwrap(next(r for r in run.commands() if r.name.endswith("-app-env")).inputs["stdin"])
    assert "sslmode=require" in env and "sslrootcert" not in env


def test_verified_modes_do_not_warn_about_tls(caplog):
    with caplog.at_level(logging.WARNING):
        run_stack(base_config(database="managed"))
    assert "databaseSslMode" not in caplog.text
