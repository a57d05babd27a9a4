"""The writer: buffered, thread-safe COPY ingestion that never loses or doubles a record.

Rooms: ``writer`` (DatabaseWriter: lifecycle and accepting), ``records`` (checking and
encoding a record once), ``sums`` (a minute's exact summary), ``batches``, ``buffers`` (what
waits for the database, under one condition), ``flush_thread``, ``commit`` (transactions,
bisection), ``statements`` (the flush's SQL), ``candles`` (the candles a flush writes), and the
spool (``spool``, ``spool_format``, ``spool_labels``, ``spool_claim``).
"""

from kraken_hist.storage.writer.records import InvalidRecordError
from kraken_hist.storage.writer.spool_labels import SpoolOwnerError
from kraken_hist.storage.writer.writer import DatabaseWriter

__all__ = ["DatabaseWriter", "InvalidRecordError", "SpoolOwnerError"]
