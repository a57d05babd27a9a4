"""PostgreSQL's binary COPY format for the fast path's rows and candles, built as numpy arrays.

The server then receives values, not text to parse: ints, microseconds and base-10000
numerics, each number with its own display scale, so the stored values are exactly the
file's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: A base-10**6 digit ("limb") of the fast path's exact integer sums.
LIMB = 10**6

#: Start of a binary COPY stream (signature, flags, header extension length) and its end.
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
BINARY_TRAILER = b"\xff\xff"
_PG_EPOCH_SECONDS = 946_684_800  # 2000-01-01 UTC, where timestamptz counts microseconds from


@dataclass(frozen=True, slots=True)
class Numeric:
    """A numeric column in PostgreSQL's binary form: base-10000 digits, most significant
    first and zero-padded to one width (the server strips the padding), the first digit's
    weight, and each value's display scale (digits after the point, as the text had)."""

    digits: np.ndarray  # (rows, width)
    weight: int
    dscale: np.ndarray


def numeric_from_scaled(values: np.ndarray, scale: int, dscale: np.ndarray) -> Numeric:
    """Non-negative int64 `values` x 10**-scale (scale a multiple of 4)."""
    groups, rest = [], values
    while True:
        rest, group = np.divmod(rest, 10_000)
        groups.append(group)
        if len(groups) > scale // 4 and not rest.any():
            break
    return Numeric(np.stack(groups[::-1], axis=1), len(groups) - 1 - scale // 4, dscale)


def numeric_from_limbs(limbs: Sequence[np.ndarray], scale: int, dscale: np.ndarray) -> Numeric:
    """A number given as base-10**6 digits (least significant first, an even count) x 10**-scale."""
    groups = []
    for low, high in zip(limbs[0::2], limbs[1::2]):  # 12 decimal digits = 3 base-10000 digits
        pair = low + high * LIMB
        groups += [pair % 10_000, pair // 10_000 % 10_000, pair // 10**8]
    return Numeric(np.stack(groups[::-1], axis=1), len(groups) - 1 - scale // 4, dscale)


def binary_tuples(columns: Sequence[tuple[str, object]], rows: int) -> bytes:
    """Binary COPY tuples (no header or trailer) from columns given as ("int8", values),
    ("int4", values), ("numeric", Numeric) or ("text", constant bytes): fixed-size records
    built as one structured array, so the server receives values, not text to parse."""
    fields: list[tuple] = [("count", ">i2")]
    for i, (kind, column) in enumerate(columns):
        fields.append((f"len{i}", ">i4"))
        if kind == "int8":
            fields.append((f"v{i}", ">i8"))
        elif kind == "int4":
            fields.append((f"v{i}", ">i4"))
        elif kind == "numeric":
            assert isinstance(column, Numeric)
            fields += [(f"n{i}", ">i2"), (f"w{i}", ">i2"), (f"s{i}", ">u2"), (f"d{i}", ">i2"),
                       (f"v{i}", ">i2", (column.digits.shape[1],))]
        else:
            assert isinstance(column, bytes)
            fields.append((f"v{i}", f"S{len(column)}"))
    out = np.zeros(rows, dtype=np.dtype(fields))
    out["count"] = len(columns)
    for i, (kind, column) in enumerate(columns):
        if kind == "numeric":
            assert isinstance(column, Numeric)
            width = column.digits.shape[1]
            out[f"len{i}"] = 8 + 2 * width
            out[f"n{i}"], out[f"w{i}"], out[f"d{i}"], out[f"v{i}"] = width, column.weight, column.dscale, column.digits
        else:
            out[f"len{i}"] = {"int8": 8, "int4": 4}.get(kind) or len(column)  # type: ignore[arg-type]
            out[f"v{i}"] = column
    return out.tobytes()


def microseconds(seconds: np.ndarray) -> np.ndarray:
    """Unix seconds as binary timestamptz (microseconds since 2000-01-01 UTC)."""
    return (seconds - _PG_EPOCH_SECONDS) * 1_000_000

