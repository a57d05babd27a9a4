"""The import's threads: a parser running ahead of the database, and a pool of writers each
with its own connection."""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import psycopg

from kraken_hist.storage.db import connect

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher(Generic[T]):
    """Runs a chunk generator in a named thread up to `depth` chunks ahead of the consumer.

    Parsing (Python) and storing (the server) then overlap; the bounded queue keeps memory
    bounded. Errors in the parser (strict mode's first bad line) are raised in the consumer.
    """

    def __init__(self, chunks: Iterator[T], name: str, depth: int = 2) -> None:
        self._chunks = chunks
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> "Prefetcher[T]":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        """Stop the parser thread (if still running) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def _run(self) -> None:
        try:
            for item in self._chunks:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, which raises it
            self._put(_Failure(exc))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class ConnectionPool:
    """`size` worker threads, each with its own autocommit connection (set up by `setup`
    statements): ``submit(fn, *args)`` runs ``fn(conn, *args)`` on one of them."""

    def __init__(self, db_url: str, size: int, setup: Sequence[str]) -> None:
        self._db_url = db_url
        self._setup = setup
        self._local = threading.local()
        self._connections: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="csv-store")

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for conn in self._connections:
            conn.close()

    def submit(self, fn: Callable[..., T], *args: Any) -> "concurrent.futures.Future[T]":
        return self._executor.submit(self._run, fn, *args)

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self._db_url, autocommit=True)
            for statement in self._setup:
                conn.execute(statement)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return fn(conn, *args)
