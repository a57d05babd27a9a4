"""Which database a spool belongs to: its label, and the one-line message when it is another's.

A spool belongs to one database, named in the slot's ``database.json`` (written atomically
before the slot holds anything): the server's ``system_identifier`` (``pg_control_system()``)
and the database's oid, which name it however it is reached, and a password-free
``host:port/dbname`` for messages. A writer that has not reached its server yet writes only
the description (a *pending* label) and completes it once it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from kraken_hist.core.errors import PermanentError

LABEL_FILE = "database.json"  # which database the slot's records belong to


class SpoolOwnerError(PermanentError):
    """A spool holds records of another database (or of an unknown one): kept, not replayed."""


@dataclass(frozen=True, slots=True)
class DatabaseIdentity:
    """A database as a spool label names it. ``system_identifier`` (the server's, from
    ``pg_control_system()``) and ``database_oid`` identify it however it is reached (None
    until the server has answered); ``description`` (``host:port/dbname``, never a password)
    is for messages."""

    description: str
    system_identifier: str | None = None
    database_oid: int | None = None
    database: str | None = None

    @property
    def known(self) -> bool:
        return self.system_identifier is not None and self.database_oid is not None

    def __str__(self) -> str:
        if self.known:
            return f"{self.description} (server {self.system_identifier}, database oid {self.database_oid})"
        return f"{self.description} (server not reached yet)"

    def to_json(self) -> dict[str, Any]:
        return {"description": self.description, "system_identifier": self.system_identifier,
                "database_oid": self.database_oid, "database": self.database}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DatabaseIdentity":
        oid = data.get("database_oid")
        sysid = data.get("system_identifier")
        return cls(str(data["description"]), None if sysid is None else str(sysid),
                   None if oid is None else int(oid), data.get("database"))


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a libpq URL or conninfo string (no user, no password)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "?"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or '?'}"


_IDENTITY_QUERY = """
SELECT (SELECT system_identifier FROM pg_control_system())::text, d.oid::bigint, d.datname
FROM pg_database d WHERE d.datname = current_database()
"""


def read_identity(conn: psycopg.Connection, description: str) -> DatabaseIdentity:
    """The identity of the database `conn` is connected to."""
    sysid, oid, name = conn.execute(_IDENTITY_QUERY).fetchone()  # type: ignore[misc]
    return DatabaseIdentity(description, sysid, oid, name)


def same_database(label: DatabaseIdentity, current: DatabaseIdentity) -> bool | None:
    """Whether a spool labelled `label` belongs to the database `current`; None while that
    cannot be told (a full label, and the current server not reached yet). A pending label
    (its writer never reached its server) is matched by description."""
    if label.known and current.known:
        return (label.system_identifier, label.database_oid) == (current.system_identifier, current.database_oid)
    if label.known:
        return None
    return label.description == current.description


def foreign_message(directory: Path, records: int, label: DatabaseIdentity | None, current: DatabaseIdentity) -> str:
    """One line: whose records a spool holds, that they are kept, and what to do."""
    where = f"spool {directory} holds {records:,} records"
    if label is None:
        return (f"{where} written without a record of their database (by an older kraken_hist); they are kept "
                f"and not replayed: if they belong to {current.description}, replay them there once with "
                f"adopt_unlabelled_spool=True (kraken-hist stream --adopt-unlabelled-spool), otherwise move "
                f"{directory} out of {directory.parent}")
    return (f"{where} for database {label}, not for {current}, the database this writer uses; they are kept "
            f"and not replayed: point KRAKEN_HIST_DATABASE_URL at {label.description} to replay them there, "
            f"or move {directory} out of {directory.parent} to go on without them")

