"""The event log's schema, as an ordered list of small named migrations.

Each migration runs once per database, in the same transaction as the row in `_migrations` that
records it, so a crash mid-migration leaves it pending rather than half applied. The schema
changes only by appending a migration here: never edit or reorder one that has shipped, because
databases in the field have already recorded it by name and will not run it again.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

from sqlite_utils import Database

Migration = Callable[[Database], None]

MIGRATIONS: list[Migration] = []


def _migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@_migration
def m001_events(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            origin TEXT NOT NULL,
            origin_seq INTEGER NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            payload BLOB NOT NULL,
            UNIQUE (origin, origin_seq)
        )
        """
    )


@_migration
def m002_snapshots(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE snapshots (
            seq INTEGER NOT NULL,
            fold_version INTEGER NOT NULL,
            state BLOB NOT NULL,
            ts REAL NOT NULL,
            PRIMARY KEY (fold_version, seq)
        )
        """
    )


def applied(db: Database) -> list[str]:
    """Names of the migrations this database has recorded, in the order they ran."""
    if not db["_migrations"].exists():
        return []
    return [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(db: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations this database has not recorded yet; return their names."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    done = set(applied(db))
    ran: list[str] = []
    for fn in migrations:
        if fn.__name__ in done:
            continue
        with db.atomic():
            fn(db)
            db.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                [fn.__name__, datetime.datetime.now(datetime.UTC).isoformat()],
            )
        ran.append(fn.__name__)
    return ran
