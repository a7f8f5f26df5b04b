"""Opt-in end-to-end tests on a real DigitalOcean account, driven by Pulumi's Automation API.

They create real resources (two s-1vcpu-1gb droplets and a reserved IP for about ten minutes)
and never run in `make test`. Run them with `pytest -m integration tests/integration` (the lead's
`make test-integration`). Each test skips, naming what is missing, unless all of this is there:

- `pulumi` (the CLI) and `ssh` on PATH, the CLI logged in to a state backend (`pulumi login ...`;
  with a passphrase backend also PULUMI_CONFIG_PASSPHRASE);
- DIGITALOCEAN_TOKEN: the provisioning token (the provider's; also used to read the reserved IP);
- E2E_FAILOVER_TOKEN: a custom-scoped token with reserved_ip:update (and its read scopes), the
  one the droplets hold; never the provisioning token;
- E2E_SSH_KEY: path of a private key without a passphrase (its public half at E2E_SSH_KEY.pub,
  or derived with ssh-keygen); registered with DigitalOcean by the stack unless it already is;
- E2E_ADMIN_CIDRS: comma-separated CIDRs allowed to SSH, including this machine's egress address;
- E2E_REGISTRY_PASSWORD: the registry password while Pulumi.staging.yaml names a registry.

The stack is Pulumi.staging.yaml's shape with database=none (the test is about failover, and a
managed cluster adds minutes), a unique name (e2e-...) and its own VPC range 10.112.X.0/24.
"""
