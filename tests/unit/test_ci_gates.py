"""What keeps CI safe and complete: secrets only behind GitHub environments a pull request cannot
pass unreviewed, the images -> rollout chain, logout on every runner, staging's own keys, the sweep
of forgotten per-PR stacks, a plan comment GitHub accepts, and docs that match the workflows."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.needs import missing_binaries, need
from tests.unit.test_workflows import WORKFLOWS, fake_pulumi, load, run_poster, run_step, step_named, steps, walk

DOCS = (ROOT / "docs" / "ci.md").read_text()
PR_EVENTS = {"pull_request", "pull_request_target"}


# ---------------------------------------------------------------------------------------------
# which secrets a job holds, and behind which environment
# ---------------------------------------------------------------------------------------------
def legs(spec: dict) -> list[dict]:
    """The matrix legs of a job ([{}] without a matrix)."""
    return spec.get("strategy", {}).get("matrix", {}).get("include") or [{}]


def resolve(text: str, leg: dict) -> str:
    return re.sub(r"\$\{\{\s*matrix\.([\w-]+)\s*\}\}", lambda m: str(leg[m.group(1)]), str(text))


def job_secrets(spec: dict, leg: dict) -> set[str]:
    """Every repository/environment secret a job (one matrix leg) can read."""
    names = set()
    for _, value in walk(spec):
        if not isinstance(value, str):
            continue
        names |= set(re.findall(r"secrets\.([A-Z][A-Z0-9_]*)", value))
        for name in re.findall(r"secrets\[format\('\{0\}([A-Z0-9_]+)', matrix\.([\w-]+)\)\]", value):
            names.add(str(leg[name[1]]) + name[0])
    return names - {"GITHUB_TOKEN"}


def documented_environments() -> dict[str, dict]:
    """docs/ci.md's environment table: name -> protection, jobs ({(file, job)}), secrets."""
    table = DOCS[DOCS.index("| environment | protection | jobs | secrets |"):]
    table = table[:table.index("\n\n")]
    envs = {}
    for row in table.splitlines()[2:]:
        name, protection, jobs, secrets = (c.strip() for c in row.strip("|").split("|"))
        listed = set()
        for part in jobs.split(";"):
            file, _, ids = part.partition(":")
            listed |= {(file.strip().strip("`"), j) for j in re.findall(r"`([\w-]+)`", ids)}
        envs[name.strip("`")] = {"reviewers": "required reviewers" in protection,
                                 "main_only": "`main` only" in protection, "jobs": listed,
                                 "secrets": set(re.findall(r"`([A-Z][A-Z0-9_]+)`", secrets))}
    return envs


def secret_jobs():
    """(workflow file, job id, job spec, matrix leg, environment, secrets) for every job that holds one."""
    for path in WORKFLOWS:
        doc = load(path.name)
        for job_id, spec in doc["jobs"].items():
            for leg in legs(spec):
                names = job_secrets(spec, leg)
                if names:
                    yield path.name, job_id, spec, leg, resolve(spec.get("environment", ""), leg), names


def runs_on_pull_requests(doc: dict, spec: dict) -> bool:
    """Can this job start from a pull request event? (Its `if` decides, when it names the event.)"""
    if not PR_EVENTS & set(doc["on"]):
        return False
    condition = str(spec.get("if", ""))
    return not condition or "pull_request" in condition


def test_the_environment_table_describes_five_protected_environments():
    envs = documented_environments()
    assert set(envs) == {"prod", "prod-preview", "staging", "staging-sweep", "images"}
    for name, env in envs.items():
        assert env["reviewers"] or env["main_only"], f"{name}: neither reviewers nor main only"
    assert envs["prod-preview"]["reviewers"] and envs["staging"]["reviewers"]
    assert envs["prod"]["main_only"] and envs["staging-sweep"]["main_only"] and envs["images"]["main_only"]


def test_no_workflow_puts_a_secret_where_every_job_reads_it():
    """Workflow-level env reaches every job, including ones without an environment gate."""
    for path in WORKFLOWS:
        text = json.dumps(load(path.name).get("env", {}))
        assert "secrets." not in text and "secrets[" not in text, f"{path.name}: a secret in the workflow's env"


def test_every_job_that_holds_a_secret_runs_in_a_documented_environment_with_those_secrets():
    envs = documented_environments()
    seen = set()
    for file, job_id, _, _, env, names in secret_jobs():
        assert env, f"{file} {job_id}: holds {sorted(names)} without an environment"
        assert env in envs, f"{file} {job_id}: environment {env!r} is not in docs/ci.md's table"
        assert (file, job_id) in envs[env]["jobs"], f"docs/ci.md: {env} does not list {file} {job_id}"
        undocumented = names - envs[env]["secrets"]
        assert not undocumented, f"{file} {job_id} ({env}) reads {sorted(undocumented)}, not listed for {env}"
        seen.add((file, job_id, env))
    # The table lists no job that does not run there.
    for env, spec in envs.items():
        for file, job_id in spec["jobs"]:
            assert (file, job_id, env) in seen, f"docs/ci.md lists {file} {job_id} under {env}, which it does not use"


def test_no_job_with_secrets_can_start_from_an_unreviewed_pull_request():
    """#17: a pull request's branch controls the workflow files of its own run, so only the
    environment's rules (kept in GitHub's settings, not in the branch) can stop it. A job that a
    pull request event starts waits for a reviewer; any other job that holds secrets in a workflow
    a pull request can trigger uses an environment that admits main only (refs/pull/N/merge is not
    main, so GitHub refuses to start it for a pull request)."""
    envs = documented_environments()
    checked = []
    for file, job_id, spec, _, env, _ in secret_jobs():
        doc = load(file)
        if runs_on_pull_requests(doc, spec):
            assert envs[env]["reviewers"], f"{file} {job_id} runs on pull requests with secrets, in {env} (no reviewer)"
            checked.append((file, job_id, env))
        elif PR_EVENTS & set(doc["on"]):
            assert envs[env]["main_only"] or envs[env]["reviewers"], f"{file} {job_id}"
    # The jobs that run a branch's program (or pip install its requirements) with secrets are among them.
    assert {(f, j) for f, j, _ in checked} == {("preview.yml", "cloud-preview"), ("staging.yml", "pr-up"),
                                               ("staging.yml", "pr-destroy")}


def test_the_destroy_on_close_runs_the_base_branchs_files_not_the_pull_requests():
    job = load("staging.yml")["jobs"]["pr-destroy"]
    checkout = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/checkout")]
    assert [c["with"].get("ref") for c in checkout] == ["${{ github.event.pull_request.base.sha }}"]
    assert not any("pip install" in str(s.get("run", "")) for s in job["steps"])


# ---------------------------------------------------------------------------------------------
# staging's own keys
# ---------------------------------------------------------------------------------------------
def test_staging_jobs_hold_only_stagings_keys_and_tokens():
    prod_only = {"DIGITALOCEAN_TOKEN", "SSH_PRIVATE_KEY", "FAILOVER_TOKEN", "DATABASE_URI", "DEPLOY_KNOWN_HOSTS",
                 "ROLLOUT_DO_TOKEN"}
    legs_seen = 0
    for file, job_id, _, _, env, names in secret_jobs():
        if env in ("staging", "staging-sweep"):
            legs_seen += 1
            assert not names & prod_only, f"{file} {job_id} ({env}) reads prod's {sorted(names & prod_only)}"
            assert {"STAGING_DIGITALOCEAN_TOKEN"} <= names
    assert legs_seen == 5  # staging, pr-up, pr-destroy, sweep, and the staging leg of cloud-preview
    # No fallback from a staging secret to prod's (`secrets.STAGING_X || secrets.X`).
    for path in WORKFLOWS:
        for _, value in walk(load(path.name)):
            if isinstance(value, str) and "STAGING_" in value:
                assert "||" not in value, f"{path.name}: {value}"


# ---------------------------------------------------------------------------------------------
# logging out
# ---------------------------------------------------------------------------------------------
LOGINS = {"scripts/ci/pulumi-login": "pulumi logout --all", 'docker login "${IMAGE%%/*}"': "docker logout"}


def test_every_job_that_logs_in_logs_out_in_an_always_run_step():
    jobs_with_login = 0
    for path in WORKFLOWS:
        for job_id, spec in load(path.name)["jobs"].items():
            runs = [str(s.get("run", "")) for s in spec["steps"]]
            for login, logout in LOGINS.items():
                first = next((i for i, r in enumerate(runs) if login in r), None)
                if first is None:
                    continue
                jobs_with_login += 1
                after = [s for s in spec["steps"][first + 1:] if logout in str(s.get("run", ""))]
                assert after and after[-1].get("if") == "always()", f"{path.name} {job_id}: no always-run `{logout}`"
    assert jobs_with_login == 10


def test_the_logout_step_clears_every_backend_and_never_fails_the_job(tmp_path):
    step = step_named(load("deploy.yml"), "up", "Log out of the state backend")
    bin_dir, log = fake_pulumi(tmp_path)
    assert run_step(step, tmp_path, bin_dir).returncode == 0
    assert (log / "1.argv").read_text().split() == ["logout", "--all"]
    # The CLI was never installed (an early step failed): the cleanup still passes.
    assert run_step(step, tmp_path, tmp_path / "nothing", PATH="/usr/bin:/bin").returncode == 0


def test_pulumi_login_stops_with_the_missing_secrets_name(tmp_path):
    bin_dir, log = fake_pulumi(tmp_path)
    step = {"run": "scripts/ci/pulumi-login"}
    proc = run_step(step, tmp_path, bin_dir, PULUMI_BACKEND_URL="s3://b?region=fra1", AWS_ACCESS_KEY_ID="k",
                    AWS_SECRET_ACCESS_KEY="", PULUMI_CONFIG_PASSPHRASE="p")
    assert proc.returncode == 1 and "AWS_SECRET_ACCESS_KEY is empty" in proc.stdout and not list(log.iterdir())
    proc = run_step(step, tmp_path, bin_dir, PULUMI_ACCESS_TOKEN="")
    assert proc.returncode == 1 and "PULUMI_ACCESS_TOKEN" in proc.stdout
    assert run_step(step, tmp_path, bin_dir, PULUMI_ACCESS_TOKEN="pul-x").returncode == 0
    assert (log / "1.argv").read_text().split() == ["login"]


# ---------------------------------------------------------------------------------------------
# images -> rolling update
# ---------------------------------------------------------------------------------------------
def test_every_workflow_run_trigger_names_a_workflow_that_exists():
    names = {load(p.name)["name"] for p in WORKFLOWS}
    triggers = [(p.name, w) for p in WORKFLOWS
                for w in (load(p.name)["on"].get("workflow_run") or {}).get("workflows", [])]
    assert sorted(triggers) == [("plan-comment.yml", "preview"), ("rolling-update.yml", "images")]
    for file, target in triggers:
        assert target in names, f"{file} waits for a workflow named {target!r}; there is none"


def fake_docker(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "dbin", tmp_path / "dlog"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "docker").write_text(f"""#!/usr/bin/env bash
n=$(( $(ls "{log}" | wc -l) + 1 ))
printf '%s\\n' "$@" > "{log}/$n.argv"
if [ "$1" = login ]; then cat > "{log}/$n.stdin"; fi
if [ "$1 $2" = "manifest inspect" ] && [ "${{3##*:}}" = missing ]; then exit 1; fi
exit 0
""")
    (bin_dir / "docker").chmod(0o755)
    return bin_dir, log


def docker_calls(log: Path) -> list[list[str]]:
    return [f.read_text().split("\n")[:-1] for f in sorted(log.glob("*.argv"), key=lambda f: int(f.stem))]


def compose_defaults() -> tuple[str | None, str | None]:
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    image = re.search(r"\$\{MINITWIT_IMAGE:-([^}]+)\}", text)
    tag = re.search(r"\$\{MINITWIT_VERSION:-([^}]+)\}", text)
    return (image.group(1) if image else None), (tag.group(1) if tag else None)


def test_images_builds_app_and_pushes_the_full_sha_and_the_tag_the_first_up_runs(tmp_path):
    doc = load("images.yml")
    assert doc["on"]["push"] == {"branches": ["main"], "paths": ["app/**"]}
    assert doc["on"]["repository_dispatch"] == {"types": ["app-image"]}
    image = "registry.example/minitwit/minitwit"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (tmp_path / "app").mkdir()
    bin_dir, log = fake_docker(tmp_path)
    env = {"IMAGE": image, "GITHUB_SHA": sha, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary")}
    assert run_step(step_named(doc, "build", "Check the build context"), tmp_path, bin_dir).returncode == 1
    (tmp_path / "app" / "Dockerfile").write_text("FROM scratch\n")
    assert run_step(step_named(doc, "build", "Check the build context"), tmp_path, bin_dir).returncode == 0
    proc = run_step(step_named(doc, "build", "Build and push"), tmp_path, bin_dir, **env)
    assert proc.returncode == 0, proc.stderr
    build, *pushes = docker_calls(log)
    assert build[0] == "build" and build[-1] == "app"
    tags = [build[i + 1] for i, a in enumerate(build) if a == "--tag"]
    assert tags == [f"{image}:{sha}", f"{image}:latest"]
    assert pushes == [["push", f"{image}:{sha}"], ["push", f"{image}:latest"]]
    assert (tmp_path / "image" / "tag").read_text() == sha + "\n"
    # `latest` is what the nodes run before any rollout; the default image is the compose file's.
    default_image, default_tag = compose_defaults()
    if default_tag:
        assert default_tag == "latest"
    if default_image:
        assert f"|| '{default_image}'" in doc["env"]["IMAGE"]


def test_the_registry_token_reaches_docker_on_stdin_only(tmp_path):
    step = step_named(load("images.yml"), "build", "Log in to the registry")
    bin_dir, log = fake_docker(tmp_path)
    token = "dop_v1_" + "7a" * 32
    proc = run_step(step, tmp_path, bin_dir, IMAGE="registry.example/minitwit/app", REGISTRY_USERNAME="ci",
                    REGISTRY_PUSH_TOKEN=token, GITHUB_JOB="build")
    assert proc.returncode == 0, proc.stderr
    assert docker_calls(log) == [["login", "registry.example", "--username", "ci", "--password-stdin"]]
    assert (log / "1.stdin").read_text() == token and token not in proc.stdout + proc.stderr
    # A build without the token stops by name; an announced public image needs none.
    proc = run_step(step, tmp_path, bin_dir, IMAGE="r.example/a", REGISTRY_USERNAME="ci", GITHUB_JOB="build")
    assert proc.returncode == 1 and "REGISTRY_PUSH_TOKEN is not set" in proc.stdout
    assert run_step(step, tmp_path, bin_dir, IMAGE="r.example/a", REGISTRY_USERNAME="ci",
                    GITHUB_JOB="announced").returncode == 0
    assert len(docker_calls(log)) == 1


@pytest.mark.parametrize("tag,ok", [("0123456789abcdef0123456789abcdef01234567", True), ("v1.2.3", True),
                                    ("$(touch pwned)", False), ("a b", False), ("", False), ("-rm", False)])
def test_an_announced_tag_is_checked_before_it_is_recorded(tmp_path, tag, ok):
    step = step_named(load("images.yml"), "announced", "Check the announced tag")
    proc = run_step(step, tmp_path, tmp_path, TAG=tag)
    assert (proc.returncode == 0) is ok, proc.stdout
    assert (tmp_path / "image" / "tag").exists() is ok and not (tmp_path / "pwned").exists()


def test_an_announced_image_must_exist_in_the_registry(tmp_path):
    step = step_named(load("images.yml"), "announced", "Check that the image exists")
    bin_dir, log = fake_docker(tmp_path)
    (tmp_path / "image").mkdir()
    summary = str(tmp_path / "summary")
    for tag, ok in (("abc123", True), ("missing", False)):
        (tmp_path / "image" / "tag").write_text(tag + "\n")
        proc = run_step(step, tmp_path, bin_dir, IMAGE="r.example/a", GITHUB_STEP_SUMMARY=summary)
        assert (proc.returncode == 0) is ok
    assert docker_calls(log)[0] == ["manifest", "inspect", "r.example/a:abc123"]


def test_the_rollout_deploys_the_tag_the_images_run_recorded(tmp_path):
    images, rollout = load("images.yml"), load("rolling-update.yml")
    uploads = {s["with"]["name"] for _, s in steps(images) if "upload-artifact" in str(s.get("uses", ""))}
    download = step_named(rollout, "rollout", "Download the tag")
    assert uploads == {download["with"]["name"]} == {"image"}
    assert download["with"]["run-id"] == "${{ github.event.workflow_run.id }}"
    assert rollout["permissions"]["actions"] == "read"
    condition = rollout["jobs"]["rollout"]["if"]
    assert "conclusion == 'success'" in condition and "'repository_dispatch'" in condition and "'push'" in condition
    step = step_named(rollout, "rollout", "Which version")
    (tmp_path / "image").mkdir()
    common = {"RUNNER_TEMP": str(tmp_path), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary")}

    def version(tag_file: str | None, given: str = "") -> str | None:
        out = tmp_path / "out"
        out.write_text("")
        if tag_file is None:
            (tmp_path / "image" / "tag").unlink(missing_ok=True)
        else:
            (tmp_path / "image" / "tag").write_text(tag_file)
        proc = run_step(step, tmp_path, tmp_path, INPUT_VERSION=given, GITHUB_OUTPUT=str(out), **common)
        return out.read_text().strip().removeprefix("version=") if proc.returncode == 0 else None

    sha = "0123456789abcdef0123456789abcdef01234567"
    assert version(sha + "\n") == sha
    assert version(None, given="v41") == "v41"            # "Run workflow" with a version (a rollback)
    assert version("$(id)\n") is None and version(None) is None


def known_hosts_step(tmp_path: Path, outputs: dict, **env) -> subprocess.CompletedProcess:
    step = step_named(load("rolling-update.yml"), "rollout", "Write the deploy key and known_hosts")
    (tmp_path / "outputs.json").write_text(json.dumps(outputs))
    return run_step(step, tmp_path, tmp_path, RUNNER_TEMP=str(tmp_path), GITHUB_STEP_SUMMARY=str(tmp_path / "s"),
                    **env)


def test_known_hosts_come_from_the_stack_when_it_exports_them_else_from_the_secret(tmp_path):
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nSENTINEL\n-----END OPENSSH PRIVATE KEY-----"
    pinned = "203.0.113.10 ssh-ed25519 AAAAstack\n"
    proc = known_hosts_step(tmp_path, {"known_hosts": pinned}, DEPLOY_SSH_KEY=key, DEPLOY_KNOWN_HOSTS="x secret")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "known_hosts").read_text().strip() == pinned.strip()
    assert stat.S_IMODE((tmp_path / "deploy_key").stat().st_mode) == 0o600
    assert "SENTINEL" not in proc.stdout + proc.stderr
    proc = known_hosts_step(tmp_path, {"reserved_ip": "203.0.113.10"}, DEPLOY_SSH_KEY=key,
                            DEPLOY_KNOWN_HOSTS="192.0.2.1 ssh-ed25519 AAAAsecret")
    assert proc.returncode == 0 and "AAAAsecret" in (tmp_path / "known_hosts").read_text()
    proc = known_hosts_step(tmp_path, {}, DEPLOY_SSH_KEY=key, DEPLOY_KNOWN_HOSTS="")
    assert proc.returncode == 1 and "known_hosts" in proc.stdout and "DEPLOY_KNOWN_HOSTS" in proc.stdout
    proc = known_hosts_step(tmp_path, {"known_hosts": pinned}, DEPLOY_SSH_KEY="")
    assert proc.returncode == 1 and "SSH_PRIVATE_KEY" in proc.stdout


# ---------------------------------------------------------------------------------------------
# the sweep of closed pull requests' stacks
# ---------------------------------------------------------------------------------------------
def test_a_daily_sweep_in_a_main_only_environment_runs_the_sweeper():
    doc = load("staging.yml")
    job = doc["jobs"]["sweep"]
    assert doc["on"]["schedule"] and "github.event_name == 'schedule'" in job["if"]
    assert job["environment"] == "staging-sweep" and job["permissions"]["pull-requests"] == "read"
    assert [s["run"] for s in job["steps"] if "sweep" in str(s.get("run", ""))] == ["scripts/ci/sweep-pr-stacks"]


def sweeper(tmp_path: Path, stacks: list[str], states: dict[int, str], fail_destroy: set[str] = frozenset()):
    export = {"deployment": {"secrets_providers": {"type": "passphrase", "state": {"salt": "v1:c2FsdA==:v1:x"}}}}
    bin_dir, log = fake_pulumi(tmp_path / "p", export)
    stub = (bin_dir / "pulumi").read_text().replace('case "$1 $2" in', f"""case "$1 $2" in
  "stack ls") echo '{json.dumps([{"name": s} for s in stacks])}' ;;
  "destroy --stack") for f in {' '.join(fail_destroy) or 'none'}; do [ "$3" = "$f" ] && exit 1; done; : ;;""")
    (bin_dir / "pulumi").write_text(stub)
    (bin_dir / "gh").write_text("#!/usr/bin/env bash\n" + "".join(
        f'[ "$2" = "repos/o/r/pulls/{n}" ] && {{ echo {state}; exit 0; }}\n' for n, state in states.items())
        + 'echo "gh: Not Found (HTTP 404)" >&2; exit 1\n')
    (bin_dir / "gh").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / "Pulumi.staging.yaml").write_text((ROOT / "Pulumi.staging.yaml").read_text())
    proc = run_step({"run": "scripts/ci/sweep-pr-stacks"}, work, bin_dir, GITHUB_REPOSITORY="o/r",
                    PULUMI_CONFIG_PASSPHRASE="pass", GITHUB_STEP_SUMMARY=str(work / "summary"))
    calls = [f.read_text().split("\n")[:-1] for f in sorted(log.glob("*.argv"), key=lambda f: int(f.stem))]
    return proc, [c for c in calls if c[0] == "destroy"], work


def test_the_sweep_destroys_the_stacks_of_closed_pull_requests_only(tmp_path):
    stacks = ["prod", "staging", "staging-pr-3", "staging-pr-7", "org/minitwit-ha/staging-pr-9", "staging-pr-12",
              "staging-pr-x", "prod-staging-pr-4"]
    proc, destroys, work = sweeper(tmp_path, stacks, {3: "closed", 7: "open", 9: "closed", 4: "closed"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert destroys == [["destroy", "--stack", f"staging-pr-{n}", "--yes", "--non-interactive", "--remove"]
                        for n in (3, 9)]
    assert "staging-pr-7: pull request #7 is open; kept" in proc.stdout
    assert "staging-pr-12: cannot read pull request #12" in proc.stdout   # unknown: kept, named
    # Each destroyed stack's file was rebuilt from staging's, with the state's salt so its secrets decrypt.
    assert (work / "Pulumi.staging-pr-3.yaml").read_text().startswith("encryptionsalt: v1:c2FsdA==:v1:x\n")
    assert "staging-pr-9: pull request #9 is closed; destroyed and removed" in (work / "summary").read_text()


def test_a_failed_destroy_does_not_stop_the_others_and_fails_the_sweep(tmp_path):
    proc, destroys, _ = sweeper(tmp_path, ["staging-pr-3", "staging-pr-5"], {3: "closed", 5: "closed"},
                                fail_destroy={"staging-pr-3"})
    assert proc.returncode == 1 and "staging-pr-3: the destroy failed" in proc.stdout
    assert [d[2] for d in destroys] == ["staging-pr-3", "staging-pr-5"]


# ---------------------------------------------------------------------------------------------
# the plan comment's size
# ---------------------------------------------------------------------------------------------
GITHUB_COMMENT_LIMIT = 65536


def test_two_failing_plans_make_one_comment_under_githubs_limit_that_says_where_the_rest_is(tmp_path):
    need(missing_binaries("node"))
    error = "head: the plan of {s} failed:\nTraceback (most recent call last):\n" + "  settings line\n" * 400
    diff = "--- base/{s}.txt\n+++ head/{s}.txt\n@@ -1,900 +1,900 @@\n" + "-    size: s-1vcpu-1gb\n+    size: x\n" * 1000
    files = {"pr-number": "9\n"}
    for s in ("prod", "staging"):
        files[f"{s}.error"], files[f"{s}.diff"] = error.format(s=s), diff.format(s=s)
    assert sum(len(v) for v in files.values()) > GITHUB_COMMENT_LIMIT
    body = run_poster(tmp_path, files, "a" * 40, [])["calls"][1][1]["body"]
    assert len(body) < GITHUB_COMMENT_LIMIT and len(body.encode()) < GITHUB_COMMENT_LIMIT
    for s in ("prod", "staging"):
        # Why it failed is shown whole (it fits half the stack's share); the diff is what gets cut.
        assert f"#### `{s}`\n:x: the plan failed:\n```text\n{files[s + '.error'].rstrip()}\n```" in body
        assert f"--- base/{s}.txt" in body
    assert "2000 changed line(s), cut" in body
    assert "65,536-character comment limit" in body
    assert "`offline-plan` artifact of [the run](https://github.invalid/run/1)" in body
    # Every fence that opens closes: the cut never leaves a block open.
    assert body.count("```text\n") == 2 and body.count("```diff\n") == 2 and body.count("</details>") == 2


def test_a_plan_that_fits_is_not_cut(tmp_path):
    need(missing_binaries("node"))
    files = {"pr-number": "9\n", "prod.diff": "--- base/prod.txt\n+++ head/prod.txt\n-a\n+b\n"}
    body = run_poster(tmp_path, files, "a" * 40, [])["calls"][1][1]["body"]
    assert "cut" not in body and "comment limit" not in body


def test_a_text_of_huge_backtick_runs_still_gives_a_comment_github_accepts(tmp_path):
    need(missing_binaries("node"))
    files = {"pr-number": "9\n", "prod.diff": "+" + "`" * 29000 + "\n", "staging.diff": "+" + "`" * 29000 + "\n"}
    body = run_poster(tmp_path, files, "a" * 40, [])["calls"][1][1]["body"]
    assert len(body) < GITHUB_COMMENT_LIMIT and "Too large for a comment" in body


# ---------------------------------------------------------------------------------------------
# docs/ci.md matches the workflows
# ---------------------------------------------------------------------------------------------
NUMBERS = {3: "Three", 4: "Four", 5: "Five", 6: "Six", 7: "Seven", 8: "Eight"}


def test_docs_count_and_list_every_workflow():
    assert f"{NUMBERS[len(WORKFLOWS)]} workflows in `.github/workflows/`" in DOCS
    table = DOCS[DOCS.index("| workflow | when | what | needs |"):]
    table = table[:table.index("\n\n")]
    listed = set(re.findall(r"^\| `([\w-]+\.yml)`", table, re.M))
    assert listed == {p.name for p in WORKFLOWS}


def test_docs_name_every_secret_the_workflows_read_and_no_other():
    read = set()
    for *_, names in secret_jobs():
        read |= names
    table = DOCS[DOCS.index("| name | what |"):]
    table = table[:table.index("\n\n")]
    documented = set()
    for row in table.splitlines()[2:]:
        documented |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1]))
    assert read == documented, f"read but not explained / explained but never read: {read ^ documented}"


def test_repository_variables_named_in_workflows_are_documented():
    used = set()
    for path in WORKFLOWS:
        used |= set(re.findall(r"vars\.([A-Z_]+)", path.read_text()))
    for name in used:
        assert f"`{name}`" in DOCS, f"docs/ci.md does not explain the variable {name}"


def test_a_self_hosted_runner_is_documented_as_private_or_ephemeral():
    section = DOCS[DOCS.index("### Self-hosted runners"):DOCS.index("## 3.")]
    for needed in ("**private repository**", "--ephemeral", "pulumi logout --all", "AGENT_TOOLSDIRECTORY"):
        assert needed in section
