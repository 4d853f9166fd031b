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
CLUSTER_TOOLS = {"kubectl", "serve", "ray", "pg_dump", "pg_restore"}
LOCAL_TOOLS = {"sqlite3", "cp", "rm"}
# run for real against a scratch data dir: read-only or idempotent, and fast
RUNNABLE = {("migrate",), ("buzz", "verify"), ("buzz", "reap"), ("audit", "verify"), ("audit", "log"),
            ("likeness", "list"), ("takedown", "list"), ("audit-prompt",)}


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", RUNBOOK.read_text(), flags=re.S)


def _commands() -> list[tuple[bool, list[str]]]:
    """(cluster_only, argv) of every shell command, environment assignments removed."""
    out = []
    for block in _blocks("sh"):
        lines = block.strip().splitlines()
        cluster = lines[0].strip() == "# cluster-only"
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for part in re.split(r"\s\|\s", line):  # each side of a pipe is a command of its own
                argv = shlex.split(part)
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv = argv[1:]
                out.append((cluster, argv))
    return out


COMMANDS = _commands()
GENSERVE = [argv[1:] for _, argv in COMMANDS if argv[0] == "genserve"]


def _ids(argvs: list[list[str]]) -> list[str]:
    return [" ".join(a)[:60] for a in argvs]


def test_the_runbook_has_commands_for_every_section():
    text = RUNBOOK.read_text()
    for topic in ("Scale", "checkpoint", "blocklist", "Drain", "Rotate tokens", "Restore the database",
                  "audit log", "takedown"):
        assert topic in text, topic
    assert len(GENSERVE) >= 20
    tools = {argv[0] for _, argv in COMMANDS}
    assert tools <= {"genserve", ".venv/bin/python"} | CLUSTER_TOOLS | LOCAL_TOOLS, tools - {"genserve"}
    for cluster, argv in COMMANDS:
        if argv[0] in {"kubectl", "serve", "ray"}:
            assert cluster, f"{' '.join(argv)} needs a cluster: put it in a '# cluster-only' block"


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
            if verb in ("get", "describe", "patch"):
                kind, name = args[1], args[2]
                assert name in names[kind], f"{' '.join(argv)}: no {kind} named {name}"
            if verb == "create":
                kind, name = args[1], args[3 if args[1] == "secret" else 2]
                assert name in names[kind], f"{' '.join(argv)}: no {kind} named {name}"
            if verb == "patch":
                import json

                patch = json.loads(args[args.index("-p") + 1])
                cluster = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]
                assert "template" in cluster["headGroupSpec"] and patch["spec"]["rayClusterConfig"]["headGroupSpec"]
            checked += 1
        if tool == "serve":
            assert args[0] in ("deploy", "status"), argv
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
