"""``python -m storage migrate``: bring the store's schema up to date (the server also does it once when
it starts; workers never do). ``python -m storage reset-password <user>``: a new one-time password for a
local account, from the server's shell (an admin who forgot theirs); ``python -m storage users`` lists
the accounts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from storage.auth import audit, users
from storage.auth.accounts import user_by_name
from storage.db import open_store
from storage.settings import Settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m storage")
    ap.add_argument("command", choices=["migrate", "users", "reset-password"],
                    help="migrate: apply the Alembic migrations not yet applied; users: list the accounts; "
                         "reset-password USER: a new one-time password for USER")
    ap.add_argument("user", nargs="?", help="the user name (reset-password)")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    where = f"the store at {settings.data_dir} ({settings.database_url.split('://')[0]})"
    database = settings.database_url.removeprefix("sqlite:///") if settings.database_url.startswith("sqlite:///") \
        else None
    if args.command != "migrate" and database is not None and not Path(database).exists():
        # (opening it would make a new, empty store: a reset there signs nobody in)
        print(f"no Neuroseg store at {settings.data_dir}: set $NEUROSEG_DATA_DIR (and $DATABASE_URL) as the server "
              "was started with", file=sys.stderr)
        return 2
    sessions, _store = open_store(settings, migrate=True)
    if args.command == "migrate":
        print(f"{where} is up to date")
        return 0
    print(where, file=sys.stderr)  # (which store it speaks of)
    with sessions.begin() as s:
        if args.command == "users":
            for u in users.list_users(s):
                state = "disabled" if u.disabled else ("single sign-on" if u.single_sign_on else "password")
                print(f"{u.username:24} {u.role:10} {state}")
            return 0
        found = user_by_name(s, args.user or "")
        if found is None:
            print(f"no user named {args.user!r}", file=sys.stderr)
            return 2
        try:
            password = users.reset_password(s, found.id)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        audit.record(s, None, "reset password", f"user {found.id}", detail="from the server's shell")
    print(f"one-time password for {found.username}: {password} (it must be changed at the next sign-in)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
