"""The README is a contract too: its config table mirrors Pulumi.yaml, its commands and links exist."""

from __future__ import annotations

import json
import re

from infra.schema import load_schema
from infra.settings import OPTIONAL_SECRETS
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def table_rows() -> list[list[str]]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def test_config_table_mirrors_the_schema():
    schema = load_schema(ROOT / "Pulumi.yaml")
    rows = table_rows()
    assert [r[0].strip("`") for r in rows] == list(schema), "README keys (and order) differ from Pulumi.yaml"
    for key, type_, default, secret, description in rows:
        c = schema[key.strip("`")]
        expected_type = c.type + (f"\\<{c.items}\\>" if c.items else "")
        assert type_ == expected_type, key
        if c.default is None:
            assert default == "*(required)*", key
        else:
            shown = c.default if isinstance(c.default, str) and c.default else json.dumps(c.default)
            assert default == f"`{shown}`", (key, default, shown)
        assert (secret == "yes") == (c.secret or c.name in OPTIONAL_SECRETS), key
        assert description, key


def test_make_targets_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    used = set(re.findall(r"\bmake ([a-z][a-z-]+)", README))
    assert used and used <= targets, used - targets


def test_linked_files_exist():
    for link in re.findall(r"\]\(((?!https?:)[^)#]+)\)", README):
        assert (ROOT / link).exists(), link
