"""Ledger account names and the checks every argument passes before a transaction starts.

System accounts (mint, promo, revenue) have no floor; user accounts (`user:<id>`) never go below
zero. Amounts are plain positive ints, so no float rounding or bool can move buzz.
"""

from __future__ import annotations

import re
from typing import Any

from genserve.billing.errors import (
    AccountNotFound,
    InvalidAccount,
    InvalidAmount,
    InvalidIdempotencyKey,
)
from genserve.core.errors import InvalidRequest
from genserve.core.ids import USER_ID_DESCRIPTION, USER_ID_RULE, is_user_id

MINT = "mint"
PROMO = "promo"
REVENUE_GENERATION = "revenue:generation"
REVENUE_TRAINING = "revenue:training"
SYSTEM_ACCOUNTS = (MINT, PROMO, REVENUE_GENERATION, REVENUE_TRAINING)
USER_PREFIX = "user:"
GRANT_KINDS = ("admin_grant", "purchase", "compensation")

_USER_ACCOUNT = re.compile(USER_PREFIX + USER_ID_RULE, re.ASCII)
_MAX_KEY_LEN = 200
_MAX_REASON_LEN = 200


def is_system_account(account: str) -> bool:
    return account in SYSTEM_ACCOUNTS


def user_account(user_id: str) -> str:
    """The account name for a user id (`"42"` -> `"user:42"`). The id follows the one rule the ingress
    checks (`genserve.core.ids`): a prefixed name such as `"user:42"` is not a user id."""
    if not is_user_id(user_id):
        raise InvalidAccount(f"malformed user id {user_id!r} ({USER_ID_DESCRIPTION})")
    return USER_PREFIX + user_id


def check_account(account: Any) -> str:
    """A valid account name, or a typed refusal."""
    if not isinstance(account, str):
        raise InvalidAccount(f"account must be a string, got {type(account).__name__}")
    if account in SYSTEM_ACCOUNTS:
        return account
    if account.startswith(USER_PREFIX):
        if _USER_ACCOUNT.fullmatch(account):
            return account
        raise InvalidAccount(f"malformed user account {account!r} (user:<id>, id of {USER_ID_DESCRIPTION})")
    raise AccountNotFound(f"unknown account {account!r}", details={"known": list(SYSTEM_ACCOUNTS)})


def check_user_account(account: Any) -> str:
    account = check_account(account)
    if is_system_account(account):
        raise InvalidAccount(f"{account!r} is a system account; only user accounts can do this")
    return account


def check_amount(amount: Any, max_amount: int, *, allow_zero: bool = False) -> int:
    """Amounts are plain ints (never bool or float), positive (or zero where it means 'nothing')."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"amount must be an integer number of buzz, got {type(amount).__name__} {amount!r}")
    low = 0 if allow_zero else 1
    if amount < low or amount > max_amount:
        raise InvalidAmount(f"amount must be between {low} and {max_amount}, got {amount}")
    return amount


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LEN:
        raise InvalidIdempotencyKey(f"idempotency key must be a non-empty string of at most {_MAX_KEY_LEN} chars")
    return key


def check_reason(reason: Any) -> str:
    if not isinstance(reason, str):
        raise InvalidRequest("reason must be a string", code="invalid_reason")
    return reason[:_MAX_REASON_LEN]


def lock_order(account: str) -> tuple[bool, str]:
    """Rows are locked users first, then system accounts: the hot revenue rows are held shortest."""
    return (is_system_account(account), account)
