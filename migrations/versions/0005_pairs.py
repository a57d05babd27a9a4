"""The pair table: every Kraken pair under all its names, in the database.

Filled from Kraken's AssetPairs (the whole answer at once) the first time a name is not
known, refreshed when stale, and readable offline afterwards; pairs Kraken no longer lists
are added from archive file names (``origin = 'file_name'``, ``status = 'inferred'``). The
eight built-in pairs are seeded so a fresh database works offline at once. ``names`` holds
every name the pair answers to (upper case) for lookups and ``kraken-hist pairs --search``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# (symbol, altname, rest_key, wsname, base, quote, price decimals): KRAKEN.md's table.
SEED = (
    ("BTC/USD", "XBTUSD", "XXBTZUSD", "XBT/USD", "XXBT", "ZUSD", 1),
    ("ETH/USD", "ETHUSD", "XETHZUSD", "ETH/USD", "XETH", "ZUSD", 2),
    ("SOL/USD", "SOLUSD", "SOLUSD", "SOL/USD", "SOL", "ZUSD", 2),
    ("ETH/BTC", "ETHXBT", "XETHXXBT", "ETH/XBT", "XETH", "XXBT", 5),
    ("BTC/USDT", "XBTUSDT", "XBTUSDT", "XBT/USDT", "XXBT", "USDT", 1),
    ("ETH/USDT", "ETHUSDT", "ETHUSDT", "ETH/USDT", "XETH", "USDT", 2),
    ("BTC/EUR", "XBTEUR", "XXBTZEUR", "XBT/EUR", "XXBT", "ZEUR", 1),
    ("DOGE/USD", "XDGUSD", "XDGUSD", "XDG/USD", "XXDG", "ZUSD", 7),
)


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE pairs (
            symbol            text        PRIMARY KEY,
            altname           text        NOT NULL,
            rest_key          text        NOT NULL,
            wsname            text,
            base              text,
            quote             text,
            price_decimals    integer     NOT NULL CHECK (price_decimals BETWEEN 0 AND 20),
            lot_decimals      integer     NOT NULL DEFAULT 8 CHECK (lot_decimals BETWEEN 0 AND 20),
            status            text        NOT NULL DEFAULT 'online',
            origin            text        NOT NULL CHECK (origin IN ('builtin', 'asset_pairs', 'file_name')),
            decimals_inferred boolean     NOT NULL DEFAULT false,
            names             text[]      NOT NULL,
            confirmed_at      timestamptz,
            updated_at        timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX pairs_names_idx ON pairs USING gin (names)")
    for symbol, altname, rest_key, wsname, base, quote, decimals in SEED:
        names = sorted({symbol, altname, rest_key, wsname, symbol.replace("/", "")})
        array = "ARRAY[" + ", ".join(f"'{n}'" for n in names) + "]"
        op.execute(
            "INSERT INTO pairs (symbol, altname, rest_key, wsname, base, quote, price_decimals, origin, names) "
            f"VALUES ('{symbol}', '{altname}', '{rest_key}', '{wsname}', '{base}', '{quote}', {decimals}, "
            f"'builtin', {array})"
        )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS pairs")
