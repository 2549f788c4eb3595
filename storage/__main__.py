"""``python -m storage migrate``: bring the store's schema up to date (the server also does it once when
it starts; workers never do)."""

from __future__ import annotations

import argparse
import sys

from storage.db import open_store
from storage.settings import Settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m storage")
    ap.add_argument("command", choices=["migrate"], help="migrate: apply the Alembic migrations not yet applied")
    ap.parse_args(argv)
    settings = Settings.from_env()
    open_store(settings, migrate=True)
    print(f"the store at {settings.data_dir} ({settings.database_url.split('://')[0]}) is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
