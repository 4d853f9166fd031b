"""Identifier rules shared by every layer: one user-id rule for the ingress, the ledger and the CLI."""

from __future__ import annotations

import re

# A user id as the site's back end names it in `X-User-Id`, and the `<id>` of the ledger account
# `user:<id>`: 1-64 of letters, digits and `_ . @ -`, starting with a letter or digit. No `:`, so an id
# can never be mistaken for an account name (`user:42` is the account of user `42`, not a user id).
USER_ID_RULE = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"
USER_ID_DESCRIPTION = "1-64 of A-Z a-z 0-9 _ . @ -, starting with a letter or digit"
_USER_ID = re.compile(USER_ID_RULE, re.ASCII)


def is_user_id(value: object) -> bool:
    return isinstance(value, str) and _USER_ID.fullmatch(value) is not None
