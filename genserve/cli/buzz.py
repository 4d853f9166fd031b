"""`genserve buzz`: balances, grants, history, reaping and reconciliation, straight on the database."""

from __future__ import annotations

import uuid

import typer

from genserve.cli.common import JsonOption, console, emit, get_settings, handle_errors, open_database

buzz_app = typer.Typer(no_args_is_help=True, help="Buzz accounts: balance, grant, history, reap, verify.")

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
