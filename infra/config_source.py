"""The ConfigSource the real program uses: this stack's config as the Pulumi engine passed it."""

from __future__ import annotations

from pulumi.runtime import config as runtime_config

from infra.schema import PROJECT


class PulumiConfigSource:
    """Raw values of the `minitwit-ha:` namespace. Reading raw (not through pulumi.Config) lets
    the settings layer validate secrets' shape without Pulumi warning about plaintext reads;
    the values never leave memory except wrapped as Output secrets."""

    prefix = f"{PROJECT}:"

    def get(self, key: str) -> str | None:
        value = runtime_config.get_config(self.prefix + key)
        return None if value is None else str(value)

    def is_secret(self, key: str) -> bool:
        return runtime_config.is_config_secret(self.prefix + key)

    def keys(self) -> list[str]:
        # The language host sets config in-process (CONFIG); older hosts pass PULUMI_CONFIG.
        names = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
        return sorted(k[len(self.prefix):] for k in names if k.startswith(self.prefix))
