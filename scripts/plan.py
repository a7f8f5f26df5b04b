#!/usr/bin/env python3
"""Offline plan: the program run under mocks with a stack's config, as a reviewable text file.

    scripts/plan.py --stack prod --out plan/prod.txt            (what `make plan STACK=prod` runs)
    scripts/plan.py --stack prod --config OTHER.yaml --out X    (plan another stack file, e.g. the base branch's)
    scripts/plan.py --diff plan-base/prod.txt plan-head/prod.txt [--out prod.diff]

No Pulumi CLI, no cloud account, no credentials, no network: the real program (`infra.program.run`)
declares its resources against `infra.offline.DoMocks`, which answer like DigitalOcean would with
values derived from resource names. The file lists every resource (type, parent, options,
dependencies, inputs), the stack outputs, the warnings the program logged, and every node's rendered
files, so a pull request's reviewer sees e.g. a changed droplet size or keepalived timing as a diff.

Secrets: encrypted values in the stack file (`secure: ...`) cannot be decrypted here, and required
secrets may be unset; each is replaced by a fixed placeholder of a valid shape and shown only as
`[secret]`. The output is byte-identical across runs and machines: no timestamps, no absolute
paths, sorted keys and names, and mock IDs that follow from names, not from registration order.
Exit codes: 0 written; 1 the config is invalid (the same messages `pulumi up` would give); 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import difflib
import gc
import hashlib
import logging
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pulumi  # noqa: E402 - after the repo root is importable
import yaml  # noqa: E402

from infra.offline import SECRET_SIG, DoMocks, Recorded, run_offline, unwrap  # noqa: E402
from infra.program import component_name, run  # noqa: E402
from infra.schema import PROJECT  # noqa: E402
from infra.settings import DictSource, SettingsError, load_settings  # noqa: E402
from infra.steps import read_archive_b64  # noqa: E402

MASKED = "[secret]"
NODES = ("primary", "standby")

# Placeholders of a valid shape, so validation passes and the structure is planned; never printed.
PLACEHOLDERS = {
    "failoverToken": "dop_v1_" + "0" * 64,
    "registryPassword": "placeholder-registry-password",
    "databaseUri": "postgresql://placeholder:placeholder@database.placeholder.invalid:5432/minitwit?sslmode=verify-full",
}
GENERIC_PLACEHOLDER = "placeholder"
REQUIRED_SECRETS = ("failoverToken",)

# Inputs whose text is shown as a block (one line per line of text) rather than inline.
BLOCK_INPUTS = frozenset({"create", "update", "delete", "userData"})
# Fields of a remote connection that are secret whatever their value.
CONNECTION_SECRETS = frozenset({"privateKey", "password", "privateKeyPassword", "agentSocketPath"})
_INSTALL_STDIN = re.compile(r"install -m (?P<mode>[0-7]{3,4}) .*?/dev/stdin (?P<path>\S+)")


class PlanError(Exception):
    """A problem the user must fix (bad config file, invalid settings)."""


# ------------------------------------------------------------------------------------------------
# the stack's config, with placeholders for what cannot be read offline
# ------------------------------------------------------------------------------------------------
def _is_secure(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"secure"}


def _has_secure(value: Any) -> bool:
    if _is_secure(value):
        return True
    if isinstance(value, dict):
        return any(_has_secure(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_secure(v) for v in value)
    return False


def _mask_nested(value: Any) -> Any:
    if _is_secure(value):
        return GENERIC_PLACEHOLDER
    if isinstance(value, dict):
        return {k: _mask_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_nested(v) for v in value]
    return value


def stack_values(config_file: Path) -> tuple[dict[str, Any], frozenset[str]]:
    """This project's raw values from a Pulumi.<stack>.yaml, secrets replaced by placeholders."""
    try:
        doc = yaml.safe_load(config_file.read_text()) or {}
    except OSError as exc:
        raise PlanError(f"cannot read the stack file {config_file.name}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{config_file.name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    config = doc.get("config") if isinstance(doc, dict) else None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise PlanError(f"{config_file.name}: `config` must be a mapping of {PROJECT}:KEY to values")
    values: dict[str, Any] = {}
    secrets: set[str] = set()
    for full_key, value in config.items():
        namespace, _, key = str(full_key).rpartition(":")
        if namespace not in ("", PROJECT):
            continue  # another namespace (e.g. digitalocean:token): the provider's, not the program's
        if _has_secure(value):
            secrets.add(key)
            value = PLACEHOLDERS.get(key, GENERIC_PLACEHOLDER) if _is_secure(value) else _mask_nested(value)
        values[key] = value
    # Secrets the operator (or CI) sets with `pulumi config set --secret` need not be in the file:
    # the plan is about structure, so an unset secret that the settings need gets a placeholder.
    needed = list(REQUIRED_SECRETS)
    if any(str(values.get(k) or "").strip() for k in ("registryServer", "registryUsername")):
        needed.append("registryPassword")
    if str(values.get("database") or "").strip() == "external":
        needed.append("databaseUri")
    for key in needed:
        if key not in values:
            values[key] = PLACEHOLDERS[key]
            secrets.add(key)
    return values, frozenset(secrets)


# ------------------------------------------------------------------------------------------------
# running the program under mocks
# ------------------------------------------------------------------------------------------------
@dataclass
class Options:
    parent: str | None = None
    depends_on: list[str] = field(default_factory=list)
    flags: dict[str, str] = field(default_factory=dict)


@dataclass
class Captured:
    stack: str
    mocks: DoMocks
    options: dict[str, Options]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    warnings: list[str]


class _Collect(logging.Handler):
    """The mocks' engine logs the program's pulumi.log messages to the root logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Only the engine's own records (it logs on the root logger): asyncio's debug-mode
        # "Executing <Task ...> took 0.8 seconds" must not make two plans differ.
        if record.name == "root":
            self.messages.append(f"{record.levelname.lower()}: {record.getMessage()}")


def _options(o: pulumi.ResourceOptions) -> Options:
    out = Options(parent=getattr(o.parent, "_name", None) if o.parent is not None else None)
    deps = o.depends_on
    if deps is not None and not isinstance(deps, list):
        deps = [deps]
    out.depends_on = sorted(str(getattr(d, "_name", d)) for d in deps or [])
    if o.protect is not None:
        out.flags["protect"] = "true" if o.protect else "false"
    if o.ignore_changes:
        out.flags["ignore_changes"] = ", ".join(sorted(o.ignore_changes))
    if o.replace_on_changes:
        out.flags["replace_on_changes"] = ", ".join(sorted(o.replace_on_changes))
    if o.delete_before_replace:
        out.flags["delete_before_replace"] = "true"
    if o.retain_on_delete:
        out.flags["retain_on_delete"] = "true"
    t = o.custom_timeouts
    if t is not None:
        parts = [f"{k}={v}" for k, v in (("create", t.create), ("update", t.update), ("delete", t.delete)) if v]
        if parts:
            out.flags["custom_timeouts"] = ", ".join(parts)
    return out


def capture(stack: str, values: dict[str, Any], secret_keys: frozenset[str], project_dir: Path) -> Captured:
    source = DictSource(values, secret_keys)
    # Validate first: the same messages `pulumi up` would print, before anything is declared.
    settings = load_settings(source, stack=stack, project_dir=project_dir)
    mocks = DoMocks(vpc_range=settings.vpc_ip_range)

    def program() -> dict[str, Any]:
        return run(source, stack=stack, project_dir=project_dir)

    collector = _Collect()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        resolved = run_offline(program, mocks, stack=stack)
    finally:
        root.removeHandler(collector)
    for message in sorted(set(collector.messages)):
        print(f"plan: {message}", file=sys.stderr)
    outputs = {k: v.value for k, v in resolved.items()}
    secret_outputs = {k for k, v in resolved.items() if v.secret}
    options = {name: _options(opts) for name, opts in mocks.options.items()}
    return Captured(stack, mocks, options, outputs, secret_outputs, sorted(set(collector.messages)))


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
class Scrub:
    """Turns machine-specific strings (the checkout's absolute path) into stable ones."""

    def __init__(self, project_dir: Path) -> None:
        self.prefixes = sorted({str(project_dir), str(project_dir.resolve())}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for prefix in self.prefixes:
            text = text.replace(prefix, "<project>")
        return text


def _scalar(value: Any, scrub: Scrub) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # numbers cross the mock wire as floats; 2.0 is the config's 2
    if isinstance(value, (int, float)):
        return str(value)
    text = scrub(str(value))
    if text == "" or text != text.strip() or text[0] in "-[{#|>'\"!&*%@`":
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _is_secret(value: Any) -> bool:
    return isinstance(value, dict) and SECRET_SIG in value


def format_value(key: str, value: Any, indent: int, scrub: Scrub) -> list[str]:
    """Deterministic YAML-like lines for one input: sorted keys, one list item per line, secrets masked."""
    pad = " " * indent
    if _is_secret(value):
        return [f"{pad}{key}: {MASKED}"]
    if isinstance(value, dict):
        if not value:
            return [f"{pad}{key}: {{}}"]
        return [f"{pad}{key}:"] + _entries(value, indent + 2, scrub)
    if isinstance(value, list):
        if not value:
            return [f"{pad}{key}: []"]
        return [f"{pad}{key}:"] + _items(value, indent + 2, scrub)
    if isinstance(value, str) and ("\n" in value or key in BLOCK_INPUTS):
        lines = [f"{pad}{key}: |"]
        lines += [f"{pad}  {scrub(line)}".rstrip() for line in value.rstrip("\n").split("\n")]
        return lines
    return [f"{pad}{key}: {_scalar(value, scrub)}"]


def _entries(mapping: dict, indent: int, scrub: Scrub) -> list[str]:
    lines: list[str] = []
    for k in sorted(mapping):
        lines += format_value(str(k), mapping[k], indent, scrub)
    return lines


def _items(items: list, indent: int, scrub: Scrub) -> list[str]:
    """List items as `- value`; a mapping item starts on the dash line, YAML style."""
    pad = " " * indent
    lines: list[str] = []
    for item in items:
        if _is_secret(item):
            lines.append(f"{pad}- {MASKED}")
        elif isinstance(item, dict) and item:
            sub = _entries(item, indent + 2, scrub)
            lines += [f"{pad}- {sub[0].lstrip()}"] + sub[1:]
        elif isinstance(item, list) and item:
            sub = _items(item, indent + 2, scrub)
            lines += [f"{pad}- {sub[0].lstrip()}"] + sub[1:]
        else:
            lines.append(f"{pad}- {_scalar(item, scrub)}")
    return lines


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PlanFile:
    path: str
    mode: int
    text: str | None  # None: secret
    step: str


def decode_archive(stdin: Any) -> dict[str, tuple[int, str]] | None:
    """A step's stdin: base64 tar.gz of its files (infra.steps.archive_b64); None if it is not one."""
    if not isinstance(stdin, str) or "\n" in stdin.strip():
        return None
    try:
        return read_archive_b64(stdin)
    except (binascii.Error, tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError):
        return None


class Renderer:
    def __init__(self, cap: Captured, project_dir: Path, config_label: str) -> None:
        self.cap = cap
        self.project_dir = project_dir
        self.scrub = Scrub(project_dir)
        self.config_label = config_label
        self.component = component_name(cap.stack)
        self.scripts = self._repo_scripts()

    def _repo_scripts(self) -> dict[str, str]:
        """sha256 of each file under scripts/ -> its repo path, to name stdin and node scripts."""
        out: dict[str, str] = {}
        for path in sorted((self.project_dir / "scripts").iterdir()):
            if path.is_file():
                try:
                    out[_sha(path.read_text())] = f"scripts/{path.name}"
                except UnicodeDecodeError:
                    continue
        return out

    # -- resources --------------------------------------------------------------------------------
    def node_and_step(self, name: str) -> tuple[str, str] | None:
        for node in NODES:
            prefix = f"{self.component}-{node}-"
            if name.startswith(prefix):
                return node, name[len(prefix):]
        return None

    def _stdin_lines(self, value: Any, pad: str) -> list[str]:
        if _is_secret(value):
            return [f"{pad}stdin: {MASKED}"]
        files = decode_archive(value)
        if files is not None:
            lines = [f"{pad}stdin: tar.gz of {len(files)} file(s); contents under \"node files\" below"]
            lines += [f"{pad}  - {path}" for path in sorted(files)]
            return lines
        text = str(value)
        known = self.scripts.get(_sha(text))
        if known:
            return [f"{pad}stdin: the text of {known} (sha256 {_sha(text)})"]
        return [f"{pad}stdin: {len(text.encode())} bytes, sha256 {_sha(text)}"]

    def _connection_lines(self, value: Any, indent: int) -> list[str]:
        plain = unwrap(value)
        if not isinstance(plain, dict):
            return format_value("connection", value, indent, self.scrub)
        raw = value.get("value") if _is_secret(value) else value
        pad = " " * indent
        lines = [f"{pad}connection:"]
        for key in sorted(plain):
            inner = raw.get(key) if isinstance(raw, dict) else None
            if key in CONNECTION_SECRETS or _is_secret(inner):
                lines.append(f"{pad}  {key}: {MASKED}")
            else:
                lines += format_value(key, plain[key], indent + 2, self.scrub)
        return lines

    def resource_lines(self, r: Recorded) -> list[str]:
        """Type, parent, options and dependencies at two spaces; the inputs under `inputs:`."""
        opts = self.cap.options.get(r.name, Options())
        lines = [f"--- {r.name}", f"  type: {r.typ}"]
        if r.resource_id:
            lines.append(f"  read (not managed): id {self.scrub(r.resource_id)}")
        lines.append(f"  parent: {opts.parent or '(stack)'}")
        for key in sorted(opts.flags):
            lines.append(f"  {key}: {opts.flags[key]}")
        if opts.depends_on:
            lines.append("  depends_on:")
            lines += [f"    - {d}" for d in opts.depends_on]
        if r.inputs:
            lines.append("  inputs:")
        for key in sorted(r.inputs):
            value = r.inputs[key]
            if key == "stdin":
                lines += self._stdin_lines(value, "    ")
            elif key == "connection":
                lines += self._connection_lines(value, 4)
            else:
                lines += format_value(key, value, 4, self.scrub)
        return lines

    # -- node files -------------------------------------------------------------------------------
    def node_files(self) -> dict[str, list[PlanFile]]:
        per_node: dict[str, dict[str, PlanFile]] = {n: {} for n in NODES}
        for r in self.cap.mocks.resources:
            where = self.node_and_step(r.name)
            if where is None or not r.typ.startswith("command:remote:"):
                continue
            node, step = where
            stdin = r.inputs.get("stdin")
            if _is_secret(stdin):
                match = _INSTALL_STDIN.search(str(r.plain("create") or ""))
                if match:
                    path = match["path"].strip("'\"")
                    per_node[node][path] = PlanFile(path, int(match["mode"], 8), None, step)
                continue
            files = decode_archive(stdin)
            for path, (mode, text) in (files or {}).items():
                shown = path[: -len(".new")] if path.endswith(".new") else path  # staged, then checked
                per_node[node][shown] = PlanFile(shown, mode, text, step)
        return {n: [files[p] for p in sorted(files)] for n, files in per_node.items()}

    def file_lines(self, f: PlanFile) -> list[str]:
        head = f"--- {f.path}  mode {f.mode:04o}  (step {f.step})"
        if f.text is None:
            return [head, f"  {MASKED}"]
        known = self.scripts.get(_sha(f.text))
        if known:
            return [head, f"  same as {known} in this checkout (sha256 {_sha(f.text)})"]
        return [head] + [f"  | {self.scrub(line)}".rstrip() for line in f.text.rstrip("\n").split("\n")]

    # -- the whole plan ---------------------------------------------------------------------------
    def render(self) -> str:
        cap = self.cap
        resources = sorted(cap.mocks.resources, key=lambda r: (r.name, r.typ))
        lines = [
            f"# Offline plan of stack \"{cap.stack}\" ({PROJECT}), from {self.config_label}",
            "#",
            "# Written by scripts/plan.py (`make plan`): the program run under mocks, without the Pulumi CLI,",
            "# a cloud account or credentials. Secrets are placeholders, shown as [secret]. IDs and addresses",
            "# are mock values derived from resource names (droplets 40000000N, public 192.0.2.x, reserved IP",
            "# 203.0.113.10 unless adopted): compare two plans; do not read them as the live stack.",
            "",
            f"== warnings ({len(cap.warnings)})",
        ]
        lines += [f"  {w}" for w in cap.warnings] or ["  (none)"]
        lines += ["", "== outputs"]
        for key in sorted(cap.outputs):
            if key in cap.secret_outputs:
                lines.append(f"  {key}: {MASKED}")
            else:
                lines += format_value(key, cap.outputs[key], 2, self.scrub)
        lines += ["", f"== resources ({len(resources)})"]
        for r in resources:
            lines += [""] + self.resource_lines(r)
        for node, files in self.node_files().items():
            lines += ["", f"== node files: {node} ({len(files)})"]
            for f in files:
                lines += [""] + self.file_lines(f)
        return "\n".join(lines) + "\n"


def render_plan(stack: str, config_file: Path | None = None, project_dir: Path = ROOT) -> str:
    """The plan text for `stack`, from `config_file` (default: the project's Pulumi.<stack>.yaml)."""
    config_file = config_file or project_dir / f"Pulumi.{stack}.yaml"
    values, secret_keys = stack_values(config_file)
    try:
        cap = capture(stack, values, secret_keys, project_dir)
    except SettingsError as err:
        raise PlanError(str(err)) from None
    return Renderer(cap, project_dir, config_file.name).render()


# ------------------------------------------------------------------------------------------------
# diff of two plans
# ------------------------------------------------------------------------------------------------
def plan_diff(base: Path, head: Path, context: int = 3) -> str:
    """Unified diff of two plan files; a missing base (a new stack) diffs against nothing."""
    old = base.read_text().splitlines(keepends=True) if base.is_file() else []
    new = head.read_text().splitlines(keepends=True) if head.is_file() else []
    label_old = f"base/{base.name}" if base.is_file() else "/dev/null"
    label_new = f"head/{head.name}" if head.is_file() else "/dev/null"
    return "".join(difflib.unified_diff(old, new, label_old, label_new, n=context))


# ------------------------------------------------------------------------------------------------
def _close_event_loops() -> None:
    """run_offline leaves asyncio loops open: the main one, and one per executor thread that the
    mock monitor ran in. Closing them before the interpreter exits keeps 'Exception ignored in
    BaseEventLoop.__del__' (and ResourceWarnings) off stderr."""
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    for loop in loops:
        if loop.is_running() or loop.is_closed():
            continue
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def _write(out: str | None, text: str) -> None:
    if out is None or out == "-":
        sys.stdout.write(text)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stack", help="stack name (e.g. prod); reads Pulumi.<stack>.yaml unless --config is given")
    mode.add_argument("--diff", nargs=2, metavar=("BASE", "HEAD"), help="unified diff of two plan files")
    ap.add_argument("--config", help="stack file to plan instead of Pulumi.<stack>.yaml (e.g. the base branch's)")
    ap.add_argument("--out", help="write here (parents created); default: stdout")
    args = ap.parse_args(argv)

    if args.diff:
        if args.config:
            ap.error("--config goes with --stack, not --diff")
        _write(args.out, plan_diff(Path(args.diff[0]), Path(args.diff[1])))
        return 0

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.stack):
        ap.error(f"--stack {args.stack!r}: use a stack name such as prod or staging-pr-12")
    config = Path(args.config) if args.config else None
    try:
        text = render_plan(args.stack, config)
    except PlanError as err:
        print(f"plan: stack {args.stack}: {err}", file=sys.stderr)
        return 1
    _write(args.out, text)
    if args.out and args.out != "-":
        print(f"plan: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        status = main()
    finally:
        _close_event_loops()  # at exit only: in-process callers (tests) keep using the loops
    sys.exit(status)
