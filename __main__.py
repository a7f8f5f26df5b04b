"""minitwit-ha: config -> validated settings -> one HaPair component -> stack outputs."""

import pulumi

from infra.config_source import PulumiConfigSource
from infra.program import export_all, run
from infra.settings import SettingsError

try:
    outputs = run(PulumiConfigSource(), stack=pulumi.get_stack())
except SettingsError as err:
    # One clear message listing every bad key; raised before any resource is declared.
    raise SystemExit(str(err)) from None
export_all(outputs)
