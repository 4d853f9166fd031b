"""`genserve buzz`: balances, grants, history, reaping and reconciliation, straight on the database."""

from __future__ import annotations

import uuid

import typer

from genserve.cli.common import JsonOption, console, emit, get_settings, handle_errors, open_database

buzz_app = typer.Typer(no_args_is_help=True, help="Buzz accounts: balance, grant, history, allowance, receipt, earnings, refund-unlock, reap, verify.")

UserArg = typer.Argument(..., metavar="USER", help="User id (42 or user:42) or a system account (mint, revenue:generation ...)")


def register(app: typer.Typer) -> None:
    app.add_typer(buzz_app, name="buzz")


def _ledger(ctx: typer.Context):  # noqa: ANN202 - Ledger, imported lazily to keep `--help` fast
    """The ledger on the configured database, which must exist (never created here: see `open_database`)."""
    from genserve.billing.ledger import Ledger

    settings = get_settings(ctx)
    return Ledger(open_database(settings, "ledger_accounts"), settings.billing)


def _account(name: str) -> str:
    """A bare id names a user; anything with a prefix (`user:`, `revenue:`) or a system name is as given."""
    from genserve.billing.ledger import SYSTEM_ACCOUNTS, user_account

    return name if name in SYSTEM_ACCOUNTS or ":" in name else user_account(name)


@buzz_app.command()
@handle_errors
def balance(ctx: typer.Context, user: str = UserArg, as_json: bool = JsonOption) -> None:
    """Posted, held and available buzz of an account."""
    account = _account(user)
    bal = _ledger(ctx).balance(account)
    emit({"account": account, **bal.to_dict()}, as_json, f"{account}: {bal.available} available ({bal.posted} posted, {bal.held} held)")


@buzz_app.command()
@handle_errors
def grant(
    ctx: typer.Context,
    user: str = UserArg,
    amount: int = typer.Argument(..., help="Whole buzz, > 0"),
    reason: str = typer.Option("", "--reason", help="Why (kept with the entry)"),
    kind: str = typer.Option("admin_grant", "--kind", help="admin_grant | purchase | compensation"),
    key: str | None = typer.Option(None, "--key", help="Idempotency key; repeat it to retry safely (default: new)"),
    as_json: bool = JsonOption,
) -> None:
    """Credit a user from the mint."""
    account = _account(user)
    ledger = _ledger(ctx)
    entry = ledger.grant(account, amount, key or f"cli-grant:{uuid.uuid4().hex}", kind=kind, reason=reason)
    bal = ledger.balance(account)
    emit(
        {"entry": entry.to_dict(), "balance": bal.to_dict()},
        as_json,
        f"granted {entry.amount} buzz to {account} (entry {entry.id}); available now {bal.available}",
    )


@buzz_app.command()
@handle_errors
def history(
    ctx: typer.Context,
    user: str = UserArg,
    limit: int = typer.Option(50, "--limit", min=1, help="Newest N entries"),
    as_json: bool = JsonOption,
) -> None:
    """An account's ledger entries, newest first."""
    account = _account(user)
    entries = _ledger(ctx).history(account, limit=limit)
    lines = [f"{account}: {len(entries)} entries"] + [
        f"  {e.created_at:%Y-%m-%d %H:%M:%S} {e.amount:+d} {e.kind} ({e.counterparty}) {e.reason}".rstrip()
        for e in entries
    ]
    emit({"account": account, "entries": [e.to_dict() for e in entries]}, as_json, "\n".join(lines))


@buzz_app.command()
@handle_errors
def reap(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Release every hold past its expiry (safe to run any time, from anywhere)."""
    n = _ledger(ctx).reap_expired()
    emit({"reaped": n}, as_json, f"released {n} expired holds")


@buzz_app.command()
@handle_errors
def verify(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Check the ledger's invariants; exits 1 and lists the problems when one fails."""
    report = _ledger(ctx).verify()
    stats = ", ".join(f"{k} {v}" for k, v in report.stats.items())
    human = f"ledger ok ({stats})" if report.ok else "\n".join([f"ledger NOT ok ({stats})"] + [f"  - {p}" for p in report.problems])
    if report.ok or as_json:
        emit(report.to_dict(), as_json, human)
    else:
        console.print(human, markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@buzz_app.command()
@handle_errors
def allowance(ctx: typer.Context, user: str = UserArg, as_json: bool = JsonOption) -> None:
    """Claim today's (UTC) free buzz for a user; a second claim the same day grants nothing."""
    account = _account(user)
    ledger = _ledger(ctx)
    entry = ledger.daily_allowance(account)
    bal = ledger.balance(account)
    granted = entry.amount if entry else 0
    human = (f"granted {granted} buzz to {account}" if entry else f"{account} already claimed today's allowance")
    emit({"account": account, "granted": granted, "already_claimed": entry is None, "balance": bal.to_dict()},
         as_json, f"{human}; available now {bal.available}")


@buzz_app.command()
@handle_errors
def receipt(ctx: typer.Context, job: str = typer.Argument(..., metavar="JOB", help="Generation job id"),
            as_json: bool = JsonOption) -> None:
    """A generation's receipt: prices applied, the hold, every capture leg, the release, audit rows."""
    from genserve.economy.receipts import generation_receipt
    from genserve.generation.jobs import JobStore
    from safety.audit_log import AuditLog

    ledger = _ledger(ctx)
    body = generation_receipt(JobStore(ledger.db).get(job), ledger, AuditLog(ledger.db.session))
    lines = [f"generation {body['job_id']} ({body['status']}): {body['delivered']} delivered, "
             f"{body['withheld']} withheld; held {(body['hold'] or {}).get('amount', 0)}, captured "
             f"{body['captured']}, released {body['released']}"]
    lines += [f"  {leg['amount']:>8} -> {leg['to']} ({leg['kind']})" for leg in body["legs"]]
    lines += [f"  audit #{a['id']} {a['kind']} {a['action']}" for a in body.get("audit", [])]
    emit(body, as_json, "\n".join(lines))


@buzz_app.command()
@handle_errors
def earnings(ctx: typer.Context, user: str = typer.Argument(..., metavar="USER", help="Owner's user id"),
             since: str | None = typer.Option(None, "--since", help="ISO date/time (UTC), inclusive"),
             until: str | None = typer.Option(None, "--until", help="ISO date/time (UTC), exclusive"),
             as_json: bool = JsonOption) -> None:
    """An owner's income (licence fees, creator tips, early access) net of the platform share."""
    import datetime as dt

    from genserve.billing.records import as_utc
    from genserve.economy.store import Economy

    def parse(value: str | None) -> dt.datetime | None:
        return None if value is None else as_utc(dt.datetime.fromisoformat(value))

    ledger = _ledger(ctx)
    body = Economy(ledger.db, ledger).earnings(user.removeprefix("user:"), parse(since), parse(until))
    lines = [f"{user}: {body['total']} buzz earned"] + [
        f"  {kind}: {v['amount']} in {v['entries']} entries" for kind, v in sorted(body["by_kind"].items())]
    emit(body, as_json, "\n".join(lines))


@buzz_app.command("refund-unlock")
@handle_errors
def refund_unlock(ctx: typer.Context, unlock_id: int = typer.Argument(..., help="Unlock or contribution id"),
                  reason: str = typer.Option("", "--reason"), as_json: bool = JsonOption) -> None:
    """Admin: give an early-access unlock or contribution back to its buyer and revoke the unlock."""
    from genserve.economy.store import Economy

    ledger = _ledger(ctx)
    body = Economy(ledger.db, ledger).refund(unlock_id, reason)
    emit(body, as_json, f"refunded {body['amount']} buzz to user:{body['user_id']} (unlock {body['id']})")
