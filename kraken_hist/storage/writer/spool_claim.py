"""Which spool slot a writer takes, and what becomes of the other slots' records.

:func:`claim` picks a writer's slot and decides about every unowned slot holding records:

* labelled with the writer's database (or pending with the same description): replayed by it
  (several such slots are merged, oldest label first);
* labelled with another database: :class:`SpoolOwnerError`; nothing is replayed or removed;
* labelled, while the writer's own server cannot be reached: *held* (records numbered, files
  untouched) until the writer reads its identity, then replayed or released (see the writer);
* unlabelled (written before spools recorded their database) or with an unreadable label:
  refused like another database's, unless the caller vouches for it (``adopt_unlabelled``),
  since nothing in it says where it was meant to go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kraken_hist.storage.writer.spool import SLOT_PREFIX, Spool
from kraken_hist.storage.writer.spool_labels import DatabaseIdentity, SpoolOwnerError, foreign_message, same_database


@dataclass(slots=True)
class Claim:
    """What :func:`claim` found: the writer's spool (recovered, labelled), the spools held
    until the writer's server is reached (recovered, files untouched, numbered first), and
    how many records all of them hold (numbered 1..recovered)."""

    spool: Spool
    held: list[Spool]
    recovered: int


def claim(root: Path, identity: DatabaseIdentity, *, adopt_unlabelled: bool = False) -> Claim:
    """Lock and open a spool slot under `root` for a writer of database `identity`, taking
    over every unowned slot that holds records of that database (merged into the oldest).

    Raises SpoolOwnerError, having changed nothing, when an unowned slot holds records of
    another database, or unlabelled records and not `adopt_unlabelled`. With `identity`
    pending (its server not reached), slots labelled with a full identity are held: numbered
    first, and neither repaired nor merged until the caller has compared the identities
    (:func:`same_database`, :meth:`Spool.absorb`). Slots owned by a living process are
    not looked at."""
    root.mkdir(parents=True, exist_ok=True)
    locked: list[Spool] = []
    own: list[Spool] = []
    held: list[Spool] = []
    empty: list[Spool] = []
    try:
        for path in sorted(_slots(root), key=_slot_index):
            candidate = Spool(path)
            if not candidate._try_lock():
                continue
            locked.append(candidate)
            if not candidate.has_segments():
                empty.append(candidate)
                continue
            label = candidate.read_label()
            verdict = adopt_unlabelled if label is None else same_database(label, identity)
            if verdict is False:
                records = candidate.count_records()
                if not records:  # nothing intact in it: free for us
                    empty.append(candidate)
                    continue
                raise SpoolOwnerError(foreign_message(candidate.directory, records, label, identity))
            (own if verdict else held).append(candidate)
        for spools in (own, held):
            spools.sort(key=lambda s: (s.created, _slot_index(s.directory)))
        seq = 1
        for spool in held:
            seq += spool.recover(seq, repair=False)
        target = own[0] if own else empty[0] if empty else _new_slot(root)
        if target not in locked:
            locked.append(target)
        seq += target.recover(seq)
        for spool in own[1:]:
            seq += spool.recover(seq)
            target.absorb(spool, front=False)
        target.write_label(identity, min((s.created for s in own if s.created), default=None) or time.time())
    except BaseException:
        for spool in locked:
            spool.close()
        raise
    for spool in locked:
        if spool is not target and spool not in held:
            spool.close()
    return Claim(target, held, seq - 1)


def _slots(root: Path) -> list[Path]:
    return [p for p in root.glob(SLOT_PREFIX + "*") if p.name[len(SLOT_PREFIX):].isdigit() and p.is_dir()]


def _slot_index(path: Path) -> int:
    return int(path.name[len(SLOT_PREFIX):])


def _new_slot(root: Path) -> Spool:
    for index in range(1024):
        path = root / f"{SLOT_PREFIX}{index}"
        if path.exists():
            continue
        spool = Spool(path)
        if spool._try_lock():
            return spool
    raise RuntimeError(f"no free spool slot under {root}")

