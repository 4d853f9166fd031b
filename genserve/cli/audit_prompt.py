"""`genserve audit-prompt`: run the prompt audit locally, for moderators and for testing rule changes.

Exit codes: 0 when the verdict is `allow` or `review` (review is a flag for a moderator, not a
refusal; the action is in the output), 3 (`EXIT_REFUSED`) when it is `block`. With `--file`, each
JSON line `{"prompt": ..., "negative": ...}` gets one verdict line; the exit code is 3 when any line
was blocked, 1 when a line could not be read (it gets an `{"error": ...}` line, the rest still run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from genserve.cli.common import EXIT_ERROR, EXIT_REFUSED, JsonOption, emit, get_settings, handle_errors
from genserve.core.errors import ConfigError, InvalidRequest
from safety.errors import RulesInvalid
from safety.prompt_audit import PromptAuditor
from safety.verdict import Action, Verdict


def _human(v: Verdict) -> str:
    lines = [v.action.value + (" (mature)" if v.mature else "") + (" (minor signal)" if v.minor_signal else "")]
    for r in v.reasons:
        where = f" {r.field}[{r.span[0]}:{r.span[1]}] {r.matched!r}" if r.span else ""
        lines.append(f"  {r.rule_id}: {r.message}{where}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("audit-prompt")
    @handle_errors
    def audit_prompt(
        ctx: typer.Context,
        prompt: str | None = typer.Argument(None, help="Prompt to audit"),
        negative: str = typer.Option("", "--negative", help="Negative prompt"),
        file: Path | None = typer.Option(None, "--file", help='JSON lines {"prompt": ..., "negative": ...}'),
        as_json: bool = JsonOption,
    ) -> None:
        """Audit PROMPT (and --negative) and print the verdict: allow, review or block with rule ids."""
        if (prompt is None) == (file is None):
            raise InvalidRequest("give a PROMPT or --file, not both")
        settings = get_settings(ctx)
        try:
            auditor = PromptAuditor.from_dir(settings.config_path(settings.safety.rules_dir))
        except RulesInvalid as exc:
            raise ConfigError(exc.message, code=exc.code) from exc
        if file is None:
            verdict = auditor.audit(prompt, negative)
            emit(verdict.to_dict(), as_json, _human(verdict))
            if verdict.action is Action.block:
                raise typer.Exit(EXIT_REFUSED)
            return
        try:
            # JSON Lines ends a line at "\n" only: str.splitlines would also cut at U+2028, U+0085, ...
            # which are legal, unescaped characters inside a JSON string.
            lines = [line.removesuffix("\r") for line in file.read_text(encoding="utf-8").split("\n")]
        except OSError as exc:
            raise InvalidRequest(f"cannot read {file}: {exc}") from exc
        blocked = unreadable = False
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("negative", ""), str):
                    raise ValueError('expected {"prompt": str, "negative": str}')
            except ValueError as exc:
                sys.stdout.write(json.dumps({"line": n, "error": {"code": "invalid_request", "message": str(exc)}}) + "\n")
                unreadable = True
                continue
            verdict = auditor.audit(row["prompt"], row.get("negative", ""))
            if as_json:
                sys.stdout.write(json.dumps(verdict.to_dict(), sort_keys=True) + "\n")
            else:
                typer.echo(f"{n}: {_human(verdict)}")
            blocked = blocked or verdict.action is Action.block
        if blocked or unreadable:
            raise typer.Exit(EXIT_REFUSED if blocked else EXIT_ERROR)
