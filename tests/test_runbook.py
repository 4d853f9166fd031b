"""Every command in deploy/RUNBOOK.md works: `genserve` commands parse against the real CLI (the cheap
ones run against a scratch database), the Python snippet runs, and commands of other tools name only
files and resources that exist here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from genserve.cli import app

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "deploy" / "RUNBOOK.md"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SECRETS = ROOT / "deploy" / "kuberay" / "secrets.example.yaml"
CLUSTER_TOOLS = {"kubectl", "pg_dump", "pg_restore", "psql", "sed"}
LOCAL_TOOLS = {"sqlite3", "cp", "rm", "pgrep", "kill"}
IN_POD_TOOLS = {"ray", "serve", "cat"}  # run inside a pod through `kubectl exec POD -- ...`
# run for real against a scratch data dir: read-only or idempotent, and fast
RUNNABLE = {("migrate",), ("buzz", "verify"), ("buzz", "reap"), ("audit", "verify"), ("audit", "log"),
            ("likeness", "list"), ("takedown", "list"), ("audit-prompt",)}


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", RUNBOOK.read_text(), flags=re.S)


def _commands() -> list[tuple[bool, list[str]]]:
    """(cluster_only, argv) of every shell command, environment assignments removed; `export X="$(cmd)"`
    counts as `cmd`."""
    out = []
    for block in _blocks("sh"):
        lines = block.strip().splitlines()
        cluster = lines[0].strip() == "# cluster-only"
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            captured = re.fullmatch(r'(?:export )?[A-Z_][A-Z0-9_]*="\$\((.*)\)"', line.strip())
            if captured:
                line = captured.group(1)
            for part in re.split(r"\s\|\s", line):  # each side of a pipe is a command of its own
                argv = shlex.split(part)
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv = argv[1:]
                out.append((cluster, argv))
    return out


def _in_pod(argv: list[str]) -> list[str] | None:
    """The command `kubectl exec POD -- ...` runs in the pod, or None."""
    if argv[:2] == ["kubectl", "exec"] and "--" in argv:
        return argv[argv.index("--") + 1:]
    return None


COMMANDS = _commands()
IN_POD = [inner for _, argv in COMMANDS if (inner := _in_pod(argv))]
GENSERVE = [argv[1:] for _, argv in COMMANDS if argv[0] == "genserve"]


def _ids(argvs: list[list[str]]) -> list[str]:
    return [" ".join(a)[:60] for a in argvs]


def test_the_runbook_has_commands_for_every_section():
    text = RUNBOOK.read_text()
    for topic in ("Scale", "checkpoint", "blocklist", "Drain", "Rotate tokens", "Restore the database",
                  "audit log", "takedown"):
        assert topic in text, topic
    for topic in ("Upgrade the cluster", "A stuck job", "Drain a node", "The head pod"):
        assert topic in text, topic
    assert len(GENSERVE) >= 20
    tools = {argv[0] for _, argv in COMMANDS}
    assert tools <= {"genserve", ".venv/bin/python"} | CLUSTER_TOOLS | LOCAL_TOOLS, tools - {"genserve"}
    assert {inner[0] for inner in IN_POD} <= IN_POD_TOOLS
    for cluster, argv in COMMANDS:
        if argv[0] in CLUSTER_TOOLS:
            assert cluster, f"{' '.join(argv)} needs a cluster: put it in a '# cluster-only' block"


def test_the_runbook_never_deploys_around_the_rayservice():
    """`serve deploy` against a RayService's cluster drifts from serveConfigV2: the runbook changes the
    cluster through the manifest only, and runs Ray's and Serve's CLIs only to look or to drain."""
    text = RUNBOOK.read_text()
    assert not [a for _, a in COMMANDS if a[:2] == ["serve", "deploy"]] + [a for a in IN_POD if a[:2] == ["serve", "deploy"]]
    assert "`serve deploy`" in text and "never" in text.split("`serve deploy`")[0][-200:] + text.split("`serve deploy`")[1][:200]
    assert {tuple(a[:2]) for a in IN_POD if a[0] in ("serve", "ray")} <= {
        ("serve", "status"), ("ray", "list"), ("ray", "drain-node"), ("ray", "job")}
    # a group's replica bounds are applied in place: no claim that they start a new cluster
    scale = text.split("## 1.")[1].split("## 2.")[0]
    assert "`maxReplicas`" in scale and "without starting a new one" in scale
    assert not re.search(r"maxReplicas[^.]*(starts|brings up) a new cluster", text)


def _section(title: str) -> str:
    text = RUNBOOK.read_text()
    return text.split(title, 1)[1].split("\n## ", 1)[0]


def test_the_procedures_are_command_sequences():
    drain = _section("## 5. Drain a node")
    for command in ('kubectl cordon "$NODE"', 'kubectl drain "$NODE" --ignore-daemonsets --delete-emptydir-data',
                    'kubectl uncordon "$NODE"', "ray drain-node"):
        assert command in drain, command
    rotate = _section("## 7. Rotate tokens")
    assert rotate.count("--from-literal=previous_service_token=\"$OLD_SERVICE_TOKEN\"") == 1, "the overlap starts"
    assert rotate.count("--from-literal=previous_service_token= ") == 1, "and ends"
    assert rotate.count("kubectl wait --for=condition=UpgradeInProgress=false") == 2, "each phase rolls the pods"
    assert rotate.count('GENSERVE_SERVICE_TOKEN="$OLD_SERVICE_TOKEN" genserve') == 2, "old token checked in and after"
    restore = _section("## 8. Restore the database")
    for command in ("REVOKE CONNECT ON DATABASE genserve", "pg_terminate_backend", "GRANT CONNECT ON DATABASE genserve",
                    'kill -INT "$GENSERVE_PID"', 'pgrep -f "genserve serve"'):
        assert command in restore, command
    assert restore.index("REVOKE CONNECT") < restore.index("pg_restore") < restore.index("GRANT CONNECT")
    assert restore.index("kill -INT") < restore.index("cp genserve-backup.db")
    stuck = _section("## 6. A stuck job")
    for command in ("genserve jobs cancel", "genserve train cancel", "ray job stop", "genserve buzz reap"):
        assert command in stuck, command


def test_ray_and_serve_commands_parse_against_their_clis():
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    checked = 0
    for argv in IN_POD:
        group = {"ray": ray_cli, "serve": serve_cli}.get(argv[0])
        if group is None:
            continue
        command, rest, path = group, list(argv[1:]), [argv[0]]
        while hasattr(command, "commands") and rest and rest[0] in command.commands:
            path.append(rest[0])
            command = command.commands[rest.pop(0)]
        assert not hasattr(command, "commands"), f"{' '.join(argv)}: names a group"
        with command.make_context(" ".join(path), rest, resilient_parsing=False):
            pass
        checked += 1
    assert checked >= 8


def test_pod_selectors_and_rollout_annotation_exist_in_the_manifest():
    doc = yaml.safe_load(RAYSERVICE.read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    labels = {f"{k}={v}" for g in groups for k, v in g["template"]["metadata"]["labels"].items()}
    labels |= {"ray.io/node-type=head", "ray.io/node-type=worker"}  # set by KubeRay on every pod
    for _, argv in COMMANDS:
        if argv[0] == "kubectl" and "-l" in argv:
            for selector in argv[argv.index("-l") + 1].split(","):
                assert selector in labels, f"{' '.join(argv)}: no pod carries {selector}"
    assert "genserve/rollout" in cluster["headGroupSpec"]["template"]["metadata"]["annotations"]
    for _, argv in COMMANDS:
        if argv[0] == "sed":
            assert "genserve\\/rollout" in argv[2] and argv[-1] == "deploy/kuberay/rayservice.yaml"


def _is_group(command) -> bool:  # noqa: ANN001 - typer ships its own click; groups have subcommands
    return hasattr(command, "commands")


def _split_path(args: list[str]) -> tuple[list[str], object, list[str]]:
    """The subcommand path, its (click) command, and the remaining arguments."""
    command = typer.main.get_command(app)
    path = []
    rest = list(args)
    while _is_group(command) and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return path, command, rest


@pytest.mark.parametrize("args", GENSERVE, ids=_ids(GENSERVE))
def test_genserve_command_parses(args):
    path, command, rest = _split_path(args)
    assert path, f"genserve {' '.join(args)}: no such command"
    assert not _is_group(command), f"genserve {' '.join(args)}: names a group, not a command"
    # click's own parser: unknown options, missing arguments and bad choices/types all raise here
    with command.make_context(" ".join(["genserve", *path]), rest, resilient_parsing=False):
        pass
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def scratch_env(tmp_path_factory, tiny_models) -> dict[str, str]:
    """A migrated data dir with the tiny checkpoints' files under its models dir (not yet registered)."""
    data = tmp_path_factory.mktemp("runbook") / "data"
    (data / "models").mkdir(parents=True)
    for child in tiny_models["sd1"].root.parent.iterdir():
        os.symlink(child, data / "models" / child.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    env["GENSERVE_DATA_DIR"] = str(data)
    result = CliRunner().invoke(app, ["migrate", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return env


RUNS = [a for a in GENSERVE if tuple(_split_path(a)[0]) in RUNNABLE]


@pytest.mark.parametrize("args", RUNS, ids=_ids(RUNS))
def test_cheap_genserve_command_runs_on_a_scratch_database(args, scratch_env, monkeypatch):
    for name, value in scratch_env.items():
        if name.startswith("GENSERVE_"):
            monkeypatch.setenv(name, value)
    if "--file" in args:  # the runbook's JSON-lines file of prompts to audit
        prompts = Path(scratch_env["GENSERVE_DATA_DIR"]) / "prompts.jsonl"
        prompts.write_text('{"prompt": "a red fox"}\n{"prompt": "a lighthouse"}\n')
        args = [prompts.as_posix() if a == "prompts.jsonl" else a for a in args]
    result = CliRunner().invoke(app, args)
    refused = "12 year old" in " ".join(args)  # the runbook audits a prompt that must be refused
    assert result.exit_code == (3 if refused else 0), result.output
    if "--json" in args:
        assert result.stdout.strip().startswith("{"), result.output


def test_register_checkpoint_snippet_runs(scratch_env):
    (snippet,) = _blocks("python")
    result = subprocess.run([sys.executable, "-c", snippet], env=scratch_env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered: tiny-sd1" in result.stdout and "tiny-sdxl" in result.stdout


def _secret_keys() -> dict[str, set[str]]:
    """Secret name -> the keys the RayService reads from it."""
    doc = yaml.safe_load(RAYSERVICE.read_text())
    refs = re.findall(r"secretKeyRef: \{name: ([\w-]+), key: (\w+)(, optional: true)?\}", RAYSERVICE.read_text())
    out: dict[str, set[str]] = {}
    for name, key, _optional in refs:
        out.setdefault(name, set()).add(key)
    assert doc and out
    return out


def _rayservice_names() -> dict[str, set[str]]:
    doc = yaml.safe_load(RAYSERVICE.read_text())
    secrets = {d["metadata"]["name"] for d in yaml.safe_load_all(SECRETS.read_text())}
    volumes = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    configmaps = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    return {"rayservice": {doc["metadata"]["name"]}, "secret": secrets, "configmap": configmaps}


def test_other_tools_name_files_and_resources_that_exist():
    names = _rayservice_names()
    checked = 0
    for _, argv in COMMANDS:
        tool, args = argv[0], argv[1:]
        if tool == "genserve":
            continue
        for arg in args:
            value = arg.split("=", 1)[-1]
            if re.match(r"^(deploy|configs|bench)/", value):
                assert (ROOT / value).exists(), f"{' '.join(argv)}: {value} does not exist"
                checked += 1
        if tool == "kubectl":
            verb = args[0]
            if verb in ("get", "describe", "patch") and args[1] in names and len(args) > 2 and not args[2].startswith("-"):
                kind, name = args[1], args[2]
                assert name in names[kind], f"{' '.join(argv)}: no {kind} named {name}"
            if verb == "wait":
                kind, name = next(a for a in args if "/" in a and not a.startswith("-")).split("/")
                assert kind != "rayservice" or name in names["rayservice"], argv
            if verb == "port-forward":
                assert args[1] == f"service/{names['rayservice'].copy().pop()}-serve-svc", argv
            if verb == "create":
                kind, name = args[1], args[3 if args[1] == "secret" else 2]
                assert name in names[kind], f"{' '.join(argv)}: no {kind} named {name}"
                if kind == "secret":  # every key the manifest reads from it is written
                    keys = {a.split("=", 1)[1] for a in args if a.startswith("--from-literal=")}
                    written = {k.split("=", 1)[0] for k in keys}
                    assert _secret_keys()[name] <= written, f"{name}: {_secret_keys()[name] - written} missing"
            if verb == "patch":
                import json

                doc = yaml.safe_load(RAYSERVICE.read_text())
                for op in json.loads(args[args.index("-p") + 1]):  # JSON patches: each path exists
                    node = doc
                    for key in op["path"].strip("/").split("/"):
                        node = node[int(key)] if isinstance(node, list) else node[key]
                    assert isinstance(node, type(op["value"])), op
            checked += 1
        if tool == ".venv/bin/python":
            script = ROOT / args[0]
            source = script.read_text()
            for flag in (a for a in args[1:] if a.startswith("--")):
                assert f'"{flag}"' in source, f"{script.name} has no {flag} option"
        if tool in ("sqlite3", "cp", "rm"):
            assert any(".genserve/genserve.db" in a for a in args), "the default SQLite file of the data dir"
    assert checked >= 8
    # the SQLite paths in the runbook are the embedded default's
    from genserve.core.config import load_settings

    default = load_settings(env={}).database_url
    assert default.endswith(".genserve/genserve.db")
