"""Job locks in Redis: one run at a time per (task, symbol), kept alive while the run lasts.

Why: beat fires a job again while the previous run may still be going, and several workers
may pick up the same job. A lock with a time-to-live, renewed by a background thread while
the job runs, lets exactly one run proceed. A holder that dies (a killed worker) stops
renewing, so its lock expires after the TTL and nothing stays stuck. Releasing compares the
owner's token inside a Lua script (redis-py's ``Lock``), so a run whose lock expired and was
taken over never deletes the new holder's lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import redis
from redis.exceptions import LockError, LockNotOwnedError

from kraken_hist.core.errors import TransientError

logger = logging.getLogger(__name__)

KEY_PREFIX = "kraken_hist:lock:"
DEFAULT_TTL = 30.0  # seconds; a dead holder blocks its job at most this long


class LockServiceUnavailableError(TransientError):
    """Redis did not answer while taking or checking a job lock."""


def lock_name(task: str, subject: str | None) -> str:
    """Redis key of the lock of `task` for `subject` (a symbol; ``*`` for "all")."""
    return f"{KEY_PREFIX}{task}:{subject if subject else '*'}"


def owner_token(label: str | None = None) -> str:
    """A token unique to one run that also says who holds the lock (host, pid, task id)."""
    parts = [socket.gethostname(), str(os.getpid())]
    if label:
        parts.append(label)
    parts.append(uuid.uuid4().hex[:12])
    return ":".join(parts)


@contextlib.contextmanager
def _redis_errors(name: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        if isinstance(exc, LockError):
            raise
        raise LockServiceUnavailableError(f"Redis unavailable for lock {name}: {exc}") from exc


class JobLock:
    """A non-blocking Redis lock renewed by a named background thread until released.

    ``acquire()`` returns False at once when another run holds the lock. While held, the
    thread resets the TTL every ``renew_every`` seconds (a third of the TTL by default); if
    the lock was lost meanwhile (expired during a long Redis outage and taken by someone
    else), ``lost`` turns True and renewal stops.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        ttl: float = DEFAULT_TTL,
        renew_every: float | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lock ttl must be positive, got {ttl}")
        renew_every = ttl / 3 if renew_every is None else renew_every
        if not 0 < renew_every < ttl:
            raise ValueError(f"renew_every must be between 0 and the ttl ({ttl}), got {renew_every}")
        self.name = name
        self.ttl = ttl
        self.renew_every = renew_every
        self.token: str | None = None
        self._client = client
        # thread_local=False: the renewal thread must see the token the job thread set.
        self._lock = client.lock(name, timeout=ttl, thread_local=False)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """True between a successful acquire() and release() (whether or not since lost)."""
        return self._thread is not None

    @property
    def lost(self) -> bool:
        """True if the lock expired or changed hands while this run believed it held it."""
        return self._lost.is_set()

    def acquire(self, label: str | None = None) -> bool:
        """Take the lock without waiting and start renewing it; False if someone holds it."""
        if self._thread is not None:
            raise RuntimeError(f"lock {self.name} is already held by this object")
        token = owner_token(label)
        with _redis_errors(self.name):
            if not self._lock.acquire(blocking=False, token=token):
                return False
        self.token = token
        self._stop.clear()
        self._lost.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lock-renewer[{self.name}]", daemon=True)
        self._thread.start()
        logger.debug("lock %s acquired by %s", self.name, token, extra={"event": "lock_acquired"})
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._lock.reacquire()
            except LockNotOwnedError:
                logger.warning(
                    "lock %s expired or was taken over while its job ran", self.name, extra={"event": "lock_lost"}
                )
                self._lost.set()
                return
            except redis.RedisError as exc:
                # Keep trying: the TTL leaves (ttl - renew_every) seconds of grace.
                logger.warning("could not renew lock %s: %s", self.name, exc, extra={"event": "lock_renew_failed"})

    def release(self) -> bool:
        """Stop renewing and delete the lock if this run still owns it; True if it did."""
        thread, self._thread = self._thread, None
        if thread is None:
            return False
        self._stop.set()
        thread.join()
        try:
            self._lock.release()
        except LockNotOwnedError:
            logger.warning("lock %s was no longer ours at release", self.name, extra={"event": "lock_lost"})
            return False
        except redis.RedisError as exc:
            # The key expires on its own within the TTL; nothing else to do.
            logger.warning("could not release lock %s: %s", self.name, exc, extra={"event": "lock_release_failed"})
            return False
        finally:
            self.token = None
        logger.debug("lock %s released", self.name, extra={"event": "lock_released"})
        return True

    def holder(self) -> str | None:
        """The token of whoever holds the lock now (None when free)."""
        with _redis_errors(self.name):
            value = self._client.get(self.name)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def __enter__(self) -> "JobLock":
        if not self.acquire():
            raise LockError(f"lock {self.name} is held by {self.holder()}", lock_name=self.name)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass
class HeldLocks:
    """Outcome of taking several locks at once: which were taken and who holds the rest."""

    acquired: list[str] = field(default_factory=list)
    busy: dict[str, str | None] = field(default_factory=dict)  # name → holder token
    locks: list[JobLock] = field(default_factory=list)

    @property
    def lost(self) -> list[str]:
        """Names of the locks that were lost while held."""
        return [lock.name for lock in self.locks if lock.lost]


@contextlib.contextmanager
def hold(
    client: redis.Redis,
    names: Sequence[str],
    *,
    ttl: float = DEFAULT_TTL,
    renew_every: float | None = None,
    label: str | None = None,
) -> Iterator[HeldLocks]:
    """Take every free lock of `names` (never waiting), renew them, release them at exit.

    The caller works on what it got (``acquired``) and reports the rest (``busy``) as
    already running elsewhere.
    """
    held = HeldLocks()
    try:
        for name in dict.fromkeys(names):  # de-duplicated, order kept
            lock = JobLock(client, name, ttl=ttl, renew_every=renew_every)
            if lock.acquire(label):
                held.locks.append(lock)
                held.acquired.append(name)
            else:
                held.busy[name] = lock.holder()
        yield held
    finally:
        for lock in held.locks:
            lock.release()
