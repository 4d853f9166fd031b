"""`genserve likeness add|check|list`, `genserve audit verify|log` and `genserve takedown ...` (moderators)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import typer

from genserve.cli.common import (
    EXIT_ERROR,
    EXIT_REFUSED,
    JsonOption,
    emit,
    get_settings,
    handle_errors,
    open_database,
)
from genserve.core.errors import Conflict, InvalidRequest, NotFound

likeness_app = typer.Typer(no_args_is_help=True, help="The likeness blocklist: LoRAs of real people that never load.")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident safety audit log.")
takedown_app = typer.Typer(no_args_is_help=True, help="Takedown requests from people reproduced by resources.")


def register(app: typer.Typer) -> None:
    app.add_typer(likeness_app, name="likeness")
    app.add_typer(audit_app, name="audit")
    app.add_typer(takedown_app, name="takedown")


@contextlib.contextmanager
def _safety_errors() -> Iterator[None]:
    """Safety's own errors as the service's typed refusals (so `handle_errors` maps them to exit codes)."""
    from safety.errors import SafetyError
    from safety.takedowns import TakedownNotFound, TakedownNotPending

    try:
        yield
    except TakedownNotFound as exc:
        raise NotFound(exc.message, code=exc.code) from exc
    except TakedownNotPending as exc:
        raise Conflict(exc.message, code=exc.code) from exc
    except SafetyError as exc:
        raise InvalidRequest(exc.message, code=exc.code) from exc


@contextlib.contextmanager
def _components(ctx: typer.Context) -> Iterator[dict]:
    """The database and the safety components built on it, for one command."""
    from safety.gate import SafetyGate
    from safety.takedowns import Takedowns

    settings = get_settings(ctx)
    db = open_database(settings, "safety_audit_log")
    try:
        with _safety_errors():
            gate = SafetyGate.build(settings.safety, settings.config_dir, db.session)
            yield {"audit": gate.audit, "blocklist": gate.blocklist,
                   "takedowns": Takedowns(db.session, gate.blocklist, gate.audit)}
    finally:
        db.dispose()


# ---- likeness -----------------------------------------------------------------------------------
@likeness_app.command("add")
@handle_errors
def likeness_add(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="The LoRA (safetensors) to blocklist"),
    person: str = typer.Option(..., "--person", help="Whose likeness it reproduces"),
    reason: str = typer.Option(..., "--reason", help="Why (kept with the entry)"),
    source: str = typer.Option("", "--source", help="Where the decision came from (takedown id, report ...)"),
    created_by: str = typer.Option("", "--created-by", help="The moderator"),
    resource_id: str | None = typer.Option(None, "--resource-id", help="The resource id, if registered"),
    as_json: bool = JsonOption,
) -> None:
    """Put FILE on the likeness blocklist (by its hashes and weight fingerprint)."""
    with _components(ctx) as c:
        entry_id = c["blocklist"].add(file, person, reason, source=source, created_by=created_by,
                                      resource_id=resource_id)
        entry = c["blocklist"].get(entry_id)
    emit(entry.to_dict(), as_json, f"blocklisted {file} as entry {entry_id} ({person}; "
                                   f"{entry.fingerprint_modules} modules fingerprinted)")


@likeness_app.command("check")
@handle_errors
def likeness_check(
    ctx: typer.Context,
    files: list[Path] = typer.Argument(..., help="The LoRAs / checkpoints (safetensors) of one request"),
    strengths: list[float] = typer.Option([], "--strength", help="Each file's strength, in order (default 1)"),
    base: Path | None = typer.Option(None, "--base", help="The family's base checkpoint, to check checkpoints "
                                                          "by their difference from it"),
    family: str | None = typer.Option(None, "--family", help="The family of --base (sd1, sdxl ...)"),
    as_json: bool = JsonOption,
) -> None:
    """Check FILEs together as one request would use them: each file's hashes and weights, then their
    combined update Σ strength·ΔW. Exit 0 when nothing matches, 3 when blocked."""
    if strengths and len(strengths) != len(files):
        raise InvalidRequest(f"give one --strength per file ({len(files)}), or none", code="strengths_mismatch")
    if base is not None and not family:
        raise InvalidRequest("--base needs --family", code="base_family_required")
    strengths = strengths or [1.0] * len(files)
    with _components(ctx) as c:
        blocklist = c["blocklist"]
        if base is not None:
            blocklist.register_base(family, base)
        prepared = [blocklist.prepare(f, family=family) for f in files]
        match = blocklist.check_combined(list(zip(prepared, strengths, strict=True)))
    data = {"blocked": match is not None, "match": match.to_dict() if match else None,
            "files": [{"file": str(f), "strength": s, "kind": p.kind,
                       "fingerprint_modules": p.fingerprint.modules if p.fingerprint else 0, **p.hashes.to_dict()}
                      for f, s, p in zip(files, strengths, prepared, strict=True)]}
    names = ", ".join(str(f) for f in files)
    if match is None:
        emit(data, as_json, f"clean: {names} match no blocklist entry" + (" together" if len(files) > 1 else ""))
        return
    culprits = ", ".join(str(files[i]) for i in match.parts) or names
    emit(data, as_json, f"BLOCKED: {culprits} match entry {match.entry_id} ({match.person}) by {match.method}"
                        f" (similarity {match.similarity:.4f})")
    raise typer.Exit(EXIT_REFUSED)


@likeness_app.command("list")
@handle_errors
def likeness_list(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Every blocklist entry, oldest first."""
    with _components(ctx) as c:
        entries = [e.to_dict() for e in c["blocklist"].list()]
    human = "\n".join(f"{e['id']:>6}  {e['person']}  {e['sha256'][:12]}  {e['source'] or '-'}  {e['reason']}"
                      for e in entries) or "the blocklist is empty"
    emit({"entries": entries}, as_json, human)


# ---- audit log ----------------------------------------------------------------------------------
@audit_app.command("verify")
@handle_errors
def audit_verify(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Check the hash chain of the whole audit log; exit 1 when a row was edited, moved or deleted."""
    with _components(ctx) as c:
        report = c["audit"].verify()
    if report.ok:
        emit(report.to_dict(), as_json, f"audit log intact: {report.checked} rows, head {report.head_id} "
                                        f"{report.head_hash or ''}")
        return
    emit(report.to_dict(), as_json, f"AUDIT LOG BROKEN at row {report.first_bad_id}: {report.message}")
    raise typer.Exit(EXIT_ERROR)


@audit_app.command("log")
@handle_errors
def audit_log(
    ctx: typer.Context,
    kind: str | None = typer.Option(None, "--kind", help="prompt, image, likeness, takedown ..."),
    action: str | None = typer.Option(None, "--action"),
    job_id: str | None = typer.Option(None, "--job-id"),
    request_id: str | None = typer.Option(None, "--request-id"),
    user_id: str | None = typer.Option(None, "--user-id"),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000),
    as_json: bool = JsonOption,
) -> None:
    """The newest audit rows, filtered."""
    with _components(ctx) as c:
        rows = [r.to_dict() for r in c["audit"].query(kind=kind, action=action, job_id=job_id, request_id=request_id,
                                                       user_id=user_id, limit=limit)]
    human = "\n".join(f"{r['id']:>8}  {r['ts']}  {r['kind']}/{r['action']}  {','.join(r['rules']) or '-'}"
                      f"  job={r['job_id'] or '-'} request={r['request_id'] or '-'}" for r in rows) or "no rows"
    emit({"rows": rows}, as_json, human)


# ---- takedowns ----------------------------------------------------------------------------------
def _takedown_line(t: dict) -> str:
    return f"{t['id']}  {t['status']}  {t['person']}  resources={','.join(t['resource_ids']) or '-'}"


@takedown_app.command("request")
@handle_errors
def takedown_request(
    ctx: typer.Context,
    person: str = typer.Option(..., "--person", help="The person asking"),
    contact: str = typer.Option("", "--contact"),
    resource_ids: list[str] = typer.Option([], "--resource-id", help="A resource that reproduces them (repeat)"),
    reason: str = typer.Option("", "--reason"),
    requested_by: str = typer.Option("", "--requested-by", help="Who filed it (support agent, form ...)"),
    as_json: bool = JsonOption,
) -> None:
    """Record a takedown request."""
    with _components(ctx) as c:
        td = c["takedowns"].request(person, contact=contact, resource_ids=resource_ids, reason=reason,
                                    requested_by=requested_by).to_dict()
    emit(td, as_json, _takedown_line(td))


@takedown_app.command("approve")
@handle_errors
def takedown_approve(
    ctx: typer.Context,
    takedown_id: str = typer.Argument(...),
    moderator: str = typer.Option(..., "--moderator"),
    files: list[Path] = typer.Option([], "--file", help="A resource file to blocklist (repeat)"),
    for_resources: list[str] = typer.Option([], "--for-resource", help="The resource id of each --file, in order"),
    note: str = typer.Option("", "--note"),
    as_json: bool = JsonOption,
) -> None:
    """Approve: blocklist the files and the person's name."""
    if for_resources and len(for_resources) != len(files):
        raise InvalidRequest("give one --for-resource per --file, or none", code="takedown_files_mismatch")
    named = dict(zip(for_resources, files, strict=True)) if for_resources else files
    with _components(ctx) as c:
        td = c["takedowns"].approve(takedown_id, moderator, named, note=note).to_dict()
    emit(td, as_json, _takedown_line(td) + f"  entries={td['entry_ids']}")


@takedown_app.command("deny")
@handle_errors
def takedown_deny(
    ctx: typer.Context,
    takedown_id: str = typer.Argument(...),
    moderator: str = typer.Option(..., "--moderator"),
    note: str = typer.Option("", "--note"),
    as_json: bool = JsonOption,
) -> None:
    """Deny a takedown request."""
    with _components(ctx) as c:
        td = c["takedowns"].deny(takedown_id, moderator, note=note).to_dict()
    emit(td, as_json, _takedown_line(td))


@takedown_app.command("list")
@handle_errors
def takedown_list(
    ctx: typer.Context,
    status: str | None = typer.Option(None, "--status", help="requested, approved or denied"),
    as_json: bool = JsonOption,
) -> None:
    """Takedown requests, oldest first."""
    with _components(ctx) as c:
        rows = [t.to_dict() for t in c["takedowns"].list(status)]
    emit({"takedowns": rows}, as_json, "\n".join(_takedown_line(t) for t in rows) or "no takedowns")
