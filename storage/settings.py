"""Where the store lives: ``NEUROSEG_DATA_DIR`` (default ``data/`` in the project folder) and
``DATABASE_URL`` (default a SQLite file in the data directory)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str

    @classmethod
    def from_env(cls, data_dir: str | os.PathLike | None = None, database_url: str | None = None) -> Settings:
        folder = Path(data_dir or os.environ.get("NEUROSEG_DATA_DIR") or PROJECT_ROOT / "data").resolve()
        url = database_url or os.environ.get("DATABASE_URL") or f"sqlite:///{folder / 'neuroseg.db'}"
        return cls(folder, url)
