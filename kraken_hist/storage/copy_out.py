"""Rows out of PostgreSQL in bulk: ``COPY (query) TO STDOUT (FORMAT csv)`` in blocks of whole
rows, parsed into Arrow tables by pyarrow's CSV reader (C++, no Python object per row).

The cheapest way out of the server, shared by the export and the trade DataFrames.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

BLOCK_BYTES = 32 * 1024 * 1024


def copy_blocks(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any],
                block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The output of a ``COPY ... TO STDOUT`` in blocks of whole rows of about `block_bytes`
    (psycopg binds the parameters client-side: COPY takes none of its own)."""
    buffer = bytearray()
    with conn.cursor().copy(statement, params) as copy:
        for data in copy:
            buffer += data
            if len(buffer) >= block_bytes:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def count_rows(block: bytes) -> int:
    """Rows in a CSV block of ours (numbers, times and short codes: no field holds a newline)."""
    return block.count(b"\n")


def parse_block(block: bytes, names: Sequence[str], types: dict[str, Any]) -> Any:
    """A block of CSV rows → a pyarrow Table with `names` typed by `types` (an unquoted empty
    field, COPY's NULL, is null)."""
    import pyarrow.csv as pcsv

    return pcsv.read_csv(
        io.BytesIO(block),
        read_options=pcsv.ReadOptions(column_names=list(names)),
        convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=True),
    )


def has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["BLOCK_BYTES", "copy_blocks", "count_rows", "has_pyarrow", "parse_block"]
