"""Job locks on the real Redis: one holder, renewal, expiry of a dead holder, owner-only release."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kraken_hist.ops.locks import (
    JobLock,
    LockServiceUnavailableError,
    hold,
    lock_name,
    owner_token,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def name(client: redis.Redis) -> Iterator[str]:
    key = lock_name("test", f"sym-{uuid.uuid4().hex[:8]}")
    yield key
    client.delete(key)


def test_lock_name_and_token_say_what_and_who() -> None:
    assert lock_name("kraken_hist.tasks.backfill_symbol", "BTC/USD") == (
        "kraken_hist:lock:kraken_hist.tasks.backfill_symbol:BTC/USD"
    )
    assert lock_name("kraken_hist.tasks.refresh_aggregates", None).endswith(":*")
    first, second = owner_token("task-1"), owner_token("task-1")
    assert "task-1" in first and first != second


def test_second_acquire_fails_until_release(client: redis.Redis, name: str) -> None:
    first = JobLock(client, name, ttl=5)
    second = JobLock(client, name, ttl=5)
    assert first.acquire("one")
    try:
        assert not second.acquire("two")
        assert second.holder() == first.token
        assert not second.held
    finally:
        assert first.release()
    assert client.get(name) is None
    assert second.acquire("two")
    assert second.release()


def test_renewal_keeps_a_live_holder_past_its_ttl(client: redis.Redis, name: str) -> None:
    lock = JobLock(client, name, ttl=0.6, renew_every=0.15)
    assert lock.acquire()
    try:
        time.sleep(1.5)  # well past the TTL: only renewal keeps the key
        assert client.get(name) is not None
        assert not JobLock(client, name, ttl=0.6).acquire()
        assert not lock.lost
    finally:
        assert lock.release()


def test_lock_of_a_killed_holder_expires_after_its_ttl(client: redis.Redis, name: str, redis_url: str) -> None:
    """A worker killed mid-task stops renewing; its lock frees itself after the TTL."""
    script = (
        "import sys, time, redis\n"
        "from kraken_hist.ops.locks import JobLock\n"
        "lock = JobLock(redis.Redis.from_url(sys.argv[1]), sys.argv[2], ttl=0.6, renew_every=0.15)\n"
        "assert lock.acquire('doomed')\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, redis_url, name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        time.sleep(0.8)  # past the TTL: renewed while alive
        survivor = JobLock(client, name, ttl=5)
        assert not survivor.acquire()
        assert "doomed" in (survivor.holder() or "")
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    deadline = time.monotonic() + 3.0
    while not survivor.acquire():
        assert time.monotonic() < deadline, "the dead holder's lock never expired"
        time.sleep(0.1)
    assert survivor.release()


def test_release_never_deletes_a_lock_taken_over_by_another_run(client: redis.Redis, name: str) -> None:
    lock = JobLock(client, name, ttl=0.6, renew_every=0.2)
    assert lock.acquire()
    client.set(name, "other-run", px=5000)  # what expiry followed by another acquire leaves
    deadline = time.monotonic() + 2.0
    while not lock.lost:
        assert time.monotonic() < deadline, "renewal did not notice the takeover"
        time.sleep(0.05)
    assert not lock.release()
    assert client.get(name) == b"other-run"


def test_release_after_expiry_is_false_and_harmless(client: redis.Redis, name: str) -> None:
    lock = JobLock(client, name, ttl=5)
    assert lock.acquire()
    client.delete(name)
    assert not lock.release()
    assert not lock.release()  # second release: nothing held any more


def test_hold_takes_the_free_locks_and_reports_the_busy_ones(client: redis.Redis) -> None:
    names = [lock_name("test-hold", f"{uuid.uuid4().hex[:6]}-{i}") for i in range(3)]
    blocker = JobLock(client, names[1], ttl=5)
    assert blocker.acquire("elsewhere")
    try:
        with hold(client, names + [names[0]], ttl=5, label="me") as held:
            assert held.acquired == [names[0], names[2]]
            assert held.busy == {names[1]: blocker.token}
            assert held.lost == []
            assert all("me" in (client.get(n) or b"").decode() for n in held.acquired)
        assert client.get(names[0]) is None and client.get(names[2]) is None
        assert client.get(names[1]) is not None
    finally:
        blocker.release()


def test_hold_releases_its_locks_when_the_job_raises(client: redis.Redis) -> None:
    name = lock_name("test-hold", uuid.uuid4().hex[:8])
    with pytest.raises(RuntimeError, match="job failed"):
        with hold(client, [name], ttl=5) as held:
            assert held.acquired == [name]
            raise RuntimeError("job failed")
    assert client.get(name) is None


def test_context_manager_refuses_a_held_lock(client: redis.Redis, name: str) -> None:
    with JobLock(client, name, ttl=5) as outer:
        with pytest.raises(redis.exceptions.LockError, match="held by"):
            with JobLock(client, name, ttl=5):
                pass
        assert outer.held
    assert client.get(name) is None


@pytest.mark.parametrize(("ttl", "renew_every"), [(0, None), (-1, None), (1, 1), (1, 0), (1, 2)])
def test_bad_timings_are_refused(ttl: float, renew_every: float | None) -> None:
    with pytest.raises(ValueError):
        JobLock(redis.Redis(), "x", ttl=ttl, renew_every=renew_every)


def test_no_redis_is_a_transient_error() -> None:
    dead = redis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    with pytest.raises(LockServiceUnavailableError, match="Redis unavailable"):
        JobLock(dead, "kraken_hist:lock:test:dead", ttl=5).acquire()
    dead.close()
