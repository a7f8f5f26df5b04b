"""The config schema in Pulumi.yaml, read as data (one source of truth for settings, plan, README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT = "minitwit-ha"
# What Pulumi's project-file schema allows in a config declaration (additionalProperties: false).
ALLOWED_ATTRIBUTES = frozenset({"type", "items", "description", "secret", "default"})
TYPES = frozenset({"string", "integer", "boolean", "array"})


@dataclass(frozen=True)
class ConfigKey:
    name: str
    type: str
    description: str
    default: Any = None
    secret: bool = False
    items: str | None = None

    @property
    def required(self) -> bool:
        return self.default is None

    @property
    def description_first_sentence(self) -> str:
        text = " ".join(self.description.split())
        return text.split(". ")[0].rstrip(".")


def load_schema(path: Path) -> dict[str, ConfigKey]:
    doc = yaml.safe_load(Path(path).read_text())
    out: dict[str, ConfigKey] = {}
    for name, decl in (doc.get("config") or {}).items():
        if not isinstance(decl, dict):
            raise ValueError(f"{path}: config key {name} must be a declaration with type and description")
        extra = set(decl) - ALLOWED_ATTRIBUTES
        if extra:
            raise ValueError(f"{path}: config key {name} has attributes Pulumi rejects: {sorted(extra)}")
        if decl.get("type") not in TYPES:
            raise ValueError(f"{path}: config key {name} has type {decl.get('type')!r}; use one of {sorted(TYPES)}")
        out[name] = ConfigKey(
            name=name,
            type=decl["type"],
            description=" ".join(str(decl.get("description", "")).split()),
            default=decl.get("default"),
            secret=bool(decl.get("secret", False)),
            items=(decl.get("items") or {}).get("type"),
        )
    return out
