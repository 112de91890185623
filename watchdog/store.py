"""SQLite persistence: the watchdog's only state that outlives the process.

Holds registered runs, the current alert states (so a firing alert is still firing
after a restart), notification deliveries (so a restart does not re-notify) and an
append-only audit log of every alert transition, notification and command. The audit
log has a retention bound (``audit_max_rows``, ``audit_max_age_s``): only its oldest
rows are ever deleted, by the store itself; a trigger refuses any other delete.

A write that fails (a full disk, an I/O error) is logged once and reported by
:meth:`Store.write_health`, which the service's ``/healthz`` reads; the caller's
exception propagates as before.

Durability: WAL journal with ``synchronous=FULL``. In WAL mode ``NORMAL`` already
survives a crash of this process (a commit is in the OS's cache before it
returns), but not a power cut or kernel crash: the last commits can roll back.
``FULL`` fsyncs the WAL at every commit, so a write this class has returned from
is on disk — the watchdog acts on what it acknowledged (a command sent to a
trainer, a page sent to a human) and must not forget it. Its write rate is a few
transactions per evaluation, so the fsync costs nothing that matters.

Thread-safe: one connection behind a re-entrant lock; every public method is one
transaction, and :meth:`transaction` groups several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.schema import Registration

log = logging.getLogger(__name__)

MAX_LIMIT = 10_000  # rows one query may return: the API pages beyond that
WRITE_FAILURE_HOLD_S = 60.0  # a failed write keeps the store reported unwritable for this long
PRUNE_AUDIT_EVERY = 1000  # appended rows between two checks of the audit log's retention


class StoreError(RuntimeError):
    """The store file cannot be used (e.g. written by a newer gradwatch)."""


def _schema_v1(conn: sqlite3.Connection) -> None:
    # One execute per statement: executescript() would COMMIT the migration's transaction.
    statements = [
        """CREATE TABLE runs (
            run TEXT NOT NULL, rank INTEGER NOT NULL,
            metrics_url TEXT NOT NULL, world_size INTEGER NOT NULL,
            registered_at REAL NOT NULL, last_seen REAL NOT NULL,
            stale INTEGER NOT NULL DEFAULT 0, last_step INTEGER,
            pid INTEGER, hostname TEXT,
            PRIMARY KEY (run, rank))""",
        """CREATE TABLE alerts (
            rule TEXT NOT NULL, fingerprint TEXT NOT NULL,
            run TEXT, state TEXT NOT NULL, active_at REAL NOT NULL,
            record TEXT NOT NULL,  -- the Alert as JSON
            PRIMARY KEY (rule, fingerprint))""",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: id order is append order
            time REAL NOT NULL, kind TEXT NOT NULL,
            run TEXT, rule TEXT, fingerprint TEXT,
            details TEXT NOT NULL DEFAULT '{}')""",
        "CREATE INDEX audit_run ON audit (run, id)",
        "CREATE INDEX audit_kind ON audit (kind, id)",
        "CREATE INDEX audit_fingerprint ON audit (fingerprint, id)",
        "CREATE INDEX audit_time ON audit (time)",
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
        """CREATE TABLE deliveries (
            notifier TEXT NOT NULL, fingerprint TEXT NOT NULL, state TEXT NOT NULL,
            episode REAL NOT NULL,  -- when the alert's firing episode began: a new episode is news
            sent_at REAL NOT NULL,
            PRIMARY KEY (notifier, fingerprint, state))""",
    ]
    for statement in statements:
        conn.execute(statement)


def _schema_v2(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE commands (
            id TEXT PRIMARY KEY, run TEXT NOT NULL, seq INTEGER NOT NULL,
            action TEXT NOT NULL, rule TEXT, fingerprint TEXT,
            issued_at REAL NOT NULL, expires_at REAL NOT NULL,
            signed TEXT NOT NULL,       -- the SignedCommand as JSON, served to the agent as is
            delivered_at REAL,          -- first time an agent's poll returned it
            ack TEXT,                   -- rank 0's Ack as JSON
            UNIQUE (run, seq))"""
    )
    conn.execute("CREATE INDEX commands_rule ON commands (run, rule, issued_at)")


def _schema_v3(conn: sqlite3.Connection) -> None:
    # The registering agent's instance id: who may replace or remove a live registration.
    conn.execute("ALTER TABLE runs ADD COLUMN instance TEXT")
    # Retention: rows up to `upto` may be deleted (oldest first, by the store's own pruning); none after.
    conn.execute("CREATE TABLE audit_retention (upto INTEGER NOT NULL)")
    conn.execute("INSERT INTO audit_retention (upto) VALUES (0)")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute(
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit WHEN old.id > (SELECT upto FROM audit_retention) "
        "BEGIN SELECT RAISE(ABORT, 'audit log is append-only: only its retention bound removes the oldest rows'); END"
    )
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")  # e.g. the write probe


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_schema_v1, _schema_v2, _schema_v3]
"""``MIGRATIONS[v]`` takes a store from schema version ``v`` to ``v + 1``. Append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class RunRecord:
    run: str
    rank: int
    metrics_url: str
    world_size: int
    registered_at: float
    last_seen: float
    stale: bool
    last_step: int | None
    pid: int | None
    hostname: str | None
    instance: str | None = None


@dataclass(frozen=True)
class WriteHealth:
    """Whether the store's last write succeeded; ``error`` and ``since`` describe the current failure."""

    writable: bool
    error: str | None = None
    since: float | None = None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    time: float
    kind: str
    run: str | None
    rule: str | None
    fingerprint: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    """The last time ``notifier`` was told about alert ``fingerprint`` in ``state`` (firing/resolved)."""

    notifier: str
    fingerprint: str
    state: str
    episode: float
    sent_at: float


def alert_to_json(alert: Alert) -> str:
    data = dataclasses.asdict(alert)
    data["labels"] = [list(pair) for pair in alert.labels]
    data["state"] = str(alert.state)
    return json.dumps(data)  # NaN/Inf values are written as NaN/Infinity, which json reads back


def alert_from_json(text: str) -> Alert:
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(Alert)}
    data = {k: v for k, v in data.items() if k in known}  # a field dropped since is ignored
    data["labels"] = tuple((str(k), str(v)) for k, v in data["labels"])
    data["state"] = AlertState(data["state"])
    return Alert(**data)


class Store:
    """The watchdog's SQLite store at ``path`` (created if missing; ``":memory:"`` for tests)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout_s: float = 5.0,
        audit_max_rows: int | None = None,
        audit_max_age_s: float | None = None,
    ) -> None:
        self.path = str(path)
        self.audit_max_rows = audit_max_rows
        self.audit_max_age_s = audit_max_age_s
        self._lock = threading.RLock()
        self._depth = 0
        self._appended_since_prune = 0
        self._write_health = WriteHealth(True)
        self._last_write_ok = -math.inf  # time.monotonic() of the last committed write
        self._last_write_failed = -math.inf
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT), not sqlite3's implicit ones.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self.journal_mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        try:
            self._migrate()
            self.prune_audit()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        with self.transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version} but this gradwatch knows up to {SCHEMA_VERSION}: "
                    "upgrade gradwatch, or point the watchdog at another store file"
                )
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](self._conn)
                self._conn.execute(f"PRAGMA user_version = {v + 1}")

    def ensure_tables(self, statements: Iterable[str]) -> None:
        """Create the tables another module keeps on this connection (``CREATE ... IF NOT EXISTS``), in one transaction."""
        with self.transaction():
            for statement in statements:
                self._conn.execute(statement)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """Group writes atomically; re-entrant, so store methods may be called inside."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                changes = self._conn.total_changes
                try:
                    yield self
                    wrote = self._conn.total_changes > changes  # a transaction that changed nothing proves nothing
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # SQLite may have rolled back itself (e.g. disk full)
                        with contextlib.suppress(sqlite3.Error):
                            self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._write_failed(exc)
                raise
            else:
                if wrote:
                    self._write_succeeded()
            finally:
                self._depth = 0

    # -- write health ----------------------------------------------------------------

    def _write_failed(self, exc: sqlite3.Error) -> None:
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
            return  # a constraint or a bug in the caller, not a store that cannot write
        self._last_write_failed = time.monotonic()
        if self._write_health.writable:  # logged once per episode, not per write
            log.error("the store %s cannot be written (%s): /healthz reports it; what is not written is lost "
                      "on restart", self.path, exc)
            self._write_health = WriteHealth(False, f"{type(exc).__name__}: {exc}", time.time())

    def _write_succeeded(self) -> None:
        self._last_write_ok = time.monotonic()
        # An episode ends only after writes have succeeded for a while with none failing: a disk
        # with a few free pages lets some writes through, and must not flap or log every time.
        if not self._write_health.writable and self._last_write_ok - self._last_write_failed >= WRITE_FAILURE_HOLD_S:
            log.warning("the store %s is writable again", self.path)
            self._write_health = WriteHealth(True)

    def write_health(self, probe_every_s: float | None = None) -> WriteHealth:
        """Whether writes succeed. With ``probe_every_s``, one small write (fsynced) tests it when no
        write succeeded within that long: a store on a full disk is found before anything needs saving."""
        if probe_every_s is not None and time.monotonic() - self._last_write_ok >= probe_every_s:
            with contextlib.suppress(sqlite3.Error), self.transaction():
                self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (str(time.time()),))
        return self._write_health

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registered runs -------------------------------------------------------------

    def register_run(self, registration: Registration, now: float) -> RunRecord:
        """Record an agent's (re-)registration: its current URL and step, not stale."""
        r = registration
        with self.transaction():
            self._conn.execute(
                """INSERT INTO runs (run, rank, metrics_url, world_size, registered_at, last_seen, stale, last_step, pid,
                                     hostname, instance)
                   VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)
                   ON CONFLICT (run, rank) DO UPDATE SET
                     metrics_url=excluded.metrics_url, world_size=excluded.world_size,
                     registered_at=excluded.registered_at, last_seen=excluded.last_seen, stale=0,
                     last_step=excluded.last_step, pid=excluded.pid, hostname=excluded.hostname,
                     instance=excluded.instance""",
                (r.run, r.rank, str(r.metrics_url), r.world_size, now, now, r.step, r.pid, r.hostname, r.instance),
            )
        return self.runs(run=r.run, rank=r.rank)[0]

    def touch_run(self, run: str, rank: int, now: float, step: int | None = None) -> bool:
        """Mark a run seen (scraped or polled) at ``now``, clear its stale flag; False if unknown."""
        with self.transaction():
            cur = self._conn.execute(
                "UPDATE runs SET last_seen=?, stale=0, last_step=COALESCE(?, last_step) WHERE run=? AND rank=?",
                (now, step, run, rank),
            )
        return cur.rowcount > 0

    def set_stale(self, run: str, rank: int, stale: bool = True) -> bool:
        with self.transaction():
            cur = self._conn.execute("UPDATE runs SET stale=? WHERE run=? AND rank=?", (int(stale), run, rank))
        return cur.rowcount > 0

    def remove_run(self, run: str, rank: int | None = None) -> int:
        """Forget a run (every rank unless ``rank`` is given); its audit history stays."""
        with self.transaction():
            if rank is None:
                cur = self._conn.execute("DELETE FROM runs WHERE run=?", (run,))
            else:
                cur = self._conn.execute("DELETE FROM runs WHERE run=? AND rank=?", (run, rank))
        return cur.rowcount

    def runs(self, *, run: str | None = None, rank: int | None = None, include_stale: bool = True) -> list[RunRecord]:
        where, params = _where(run=run, rank=rank)
        if not include_stale:
            where.append("stale=0")
        rows = self._query(f"SELECT * FROM runs {_and(where)} ORDER BY run, rank", params)
        return [RunRecord(**{**dict(row), "stale": bool(row["stale"])}) for row in rows]

    # -- alert states ----------------------------------------------------------------

    def replace_alerts(self, alerts: Iterable[Alert], *, rule: str | None = None) -> None:
        """Make the stored alerts exactly ``alerts`` (only rule ``rule``'s when given), atomically."""
        with self.transaction():
            if rule is None:
                self._conn.execute("DELETE FROM alerts")
            else:
                self._conn.execute("DELETE FROM alerts WHERE rule=?", (rule,))
            self._conn.executemany(
                "INSERT OR REPLACE INTO alerts (rule, fingerprint, run, state, active_at, record) VALUES (?, ?, ?, ?, ?, ?)",
                [(a.rule, a.fingerprint, a.label("run") or None, str(a.state), a.active_at, alert_to_json(a)) for a in alerts],
            )

    def alerts(
        self,
        *,
        run: str | None = None,
        rule: str | None = None,
        state: AlertState | str | None = None,
        limit: int = MAX_LIMIT,
    ) -> list[Alert]:
        """The current alert states (as the engine last saved them), oldest first."""
        where, params = _where(run=run, rule=rule, state=str(state) if state is not None else None)
        rows = self._query(
            f"SELECT record FROM alerts {_and(where)} ORDER BY active_at, rule, fingerprint LIMIT ?", [*params, _limit(limit)]
        )
        return [alert_from_json(row["record"]) for row in rows]

    def alert_history(
        self,
        *,
        run: str | None = None,
        rule: str | None = None,
        fingerprint: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Past alert transitions (audit kinds ``alert.*``), newest first."""
        return self.audit(
            kind="alert.", run=run, rule=rule, fingerprint=fingerprint, since=since, limit=limit, newest_first=True
        )

    # -- audit log -------------------------------------------------------------------

    def append_audit(
        self,
        kind: str,
        *,
        time: float,
        run: str | None = None,
        rule: str | None = None,
        fingerprint: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one entry (kind like ``alert.firing``, ``notify.sent``, ``command.acked``); returns its id."""
        entry = dict(kind=kind, time=time, run=run, rule=rule, fingerprint=fingerprint, details=details)
        return self.append_audit_many([entry])[0]

    def append_audit_many(self, entries: Iterable[Mapping[str, Any]]) -> list[int]:
        """Append several entries (each with :meth:`append_audit`'s keywords) in one transaction."""
        ids = []
        with self.transaction():
            for e in entries:
                if "." not in e["kind"]:
                    raise ValueError(f"audit kind {e['kind']!r} must be 'area.event', e.g. 'notify.sent'")
                cur = self._conn.execute(
                    "INSERT INTO audit (time, kind, run, rule, fingerprint, details) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        e["time"],
                        e["kind"],
                        e.get("run"),
                        e.get("rule"),
                        e.get("fingerprint"),
                        json.dumps(dict(e.get("details") or {})),
                    ),
                )
                ids.append(cur.lastrowid)
            self._appended_since_prune += len(ids)
            if self._appended_since_prune >= PRUNE_AUDIT_EVERY:
                self.prune_audit(now=max(e["time"] for e in entries))
        return ids

    def prune_audit(self, now: float | None = None) -> int:
        """Apply the retention bound: drop the oldest rows beyond ``audit_max_rows`` and those older than
        ``audit_max_age_s`` before ``now`` (default: the newest row's time), as a prefix of the log: a row
        is never dropped before an older one. Returns how many were dropped."""
        self._appended_since_prune = 0
        if self.audit_max_rows is None and self.audit_max_age_s is None:
            return 0
        with self.transaction():
            newest = self._conn.execute("SELECT MAX(id) FROM audit").fetchone()[0]
            if newest is None:
                return 0
            upto = 0
            if self.audit_max_rows is not None:
                upto = newest - self.audit_max_rows  # ids are contiguous but for pruned prefixes
            if self.audit_max_age_s is not None:
                if now is None:  # the newest row's time: a fake clock's store is pruned by its own dates
                    now = self._conn.execute("SELECT MAX(time) FROM audit").fetchone()[0]
                cutoff = now - self.audit_max_age_s
                first_kept = self._conn.execute("SELECT MIN(id) FROM audit WHERE time >= ?", (cutoff,)).fetchone()[0]
                upto = max(upto, (newest if first_kept is None else first_kept - 1))
            if upto <= 0:
                return 0
            self._conn.execute("UPDATE audit_retention SET upto = MAX(upto, ?)", (upto,))
            return self._conn.execute("DELETE FROM audit WHERE id <= ?", (upto,)).rowcount

    def audit_size(self) -> int:
        """Rows in the audit log."""
        return self._query("SELECT COUNT(*) AS n FROM audit")[0]["n"]

    def audit(
        self,
        *,
        run: str | None = None,
        kind: str | None = None,
        rule: str | None = None,
        fingerprint: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[AuditEntry]:
        """Audit entries matching every filter given, in append order (or newest first).

        ``kind`` ending in ``.`` matches a family (``"notify."``); ``since``/``until``
        bound ``time`` (inclusive/exclusive); ``after_id`` pages forward.
        """
        where, params = _where(run=run, rule=rule, fingerprint=fingerprint)
        if kind is not None:
            if kind.endswith("."):
                where.append("substr(kind, 1, ?) = ?")
                params += [len(kind), kind]
            else:
                where.append("kind = ?")
                params.append(kind)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time < ?")
            params.append(until)
        if after_id is not None:
            where.append("id > ?")
            params.append(after_id)
        order = "DESC" if newest_first else "ASC"
        rows = self._query(f"SELECT * FROM audit {_and(where)} ORDER BY id {order} LIMIT ?", [*params, _limit(limit)])
        return [AuditEntry(**{**dict(row), "details": json.loads(row["details"])}) for row in rows]

    # -- notification deliveries ----------------------------------------------------

    def record_deliveries(self, notifier: str, delivered: Iterable[tuple[str, str, float]], sent_at: float) -> None:
        """Remember that ``notifier`` was told ``(fingerprint, state, episode)`` at ``sent_at``."""
        with self.transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO deliveries (notifier, fingerprint, state, episode, sent_at) VALUES (?, ?, ?, ?, ?)",
                [(notifier, fp, state, episode, sent_at) for fp, state, episode in delivered],
            )

    def deliveries(self, notifier: str, fingerprints: Iterable[str]) -> dict[tuple[str, str], Delivery]:
        """The last delivery per ``(fingerprint, state)`` for these alerts, to decide what is due."""
        fps = list(dict.fromkeys(fingerprints))
        found: dict[tuple[str, str], Delivery] = {}
        for i in range(0, len(fps), 500):  # stay far below SQLite's bound-parameter limit
            chunk = fps[i : i + 500]
            rows = self._query(
                f"SELECT * FROM deliveries WHERE notifier=? AND fingerprint IN ({','.join('?' * len(chunk))})", [notifier, *chunk]
            )
            for row in rows:
                found[(row["fingerprint"], row["state"])] = Delivery(**dict(row))
        return found

    def prune_deliveries(self, before: float) -> int:
        """Forget deliveries sent before ``before`` (older than any repeat interval in use)."""
        with self.transaction():
            return self._conn.execute("DELETE FROM deliveries WHERE sent_at < ?", (before,)).rowcount


@dataclass(frozen=True)
class CommandRecord:
    id: str
    run: str
    seq: int
    action: str
    rule: str | None
    fingerprint: str | None
    issued_at: float
    expires_at: float
    signed: str
    delivered_at: float | None
    ack: dict[str, Any] | None


def _command(row: sqlite3.Row) -> CommandRecord:
    data = dict(row)
    data["ack"] = json.loads(data["ack"]) if data["ack"] else None
    return CommandRecord(**data)


class CommandTable:
    """Commands issued to runs: numbered per run, polled by agents, closed by acknowledgements."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def next_seq(self, run: str) -> int:
        rows = self.store._query("SELECT COALESCE(MAX(seq), 0) AS seq FROM commands WHERE run=?", [run])
        return rows[0]["seq"] + 1

    def add(self, record: CommandRecord) -> None:
        with self.store.transaction():
            self.store._conn.execute(
                """INSERT INTO commands (id, run, seq, action, rule, fingerprint, issued_at, expires_at, signed)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (record.id, record.run, record.seq, record.action, record.rule, record.fingerprint,
                 record.issued_at, record.expires_at, record.signed),
            )

    def after(self, run: str, seq: int, now: float) -> list[CommandRecord]:
        """Unexpired, unacknowledged commands of ``run`` numbered above ``seq``, oldest first.

        An acknowledged command is done: a new trainer that reuses the run name (and polls
        from seq 0) must not get the previous one's remediation."""
        rows = self.store._query(
            "SELECT * FROM commands WHERE run=? AND seq>? AND expires_at>=? AND ack IS NULL ORDER BY seq",
            [run, seq, now],
        )
        return [_command(r) for r in rows]

    def mark_delivered(self, ids: Iterable[str], now: float) -> list[str]:
        """Set delivered_at on first delivery; returns the ids delivered for the first time."""
        first = []
        with self.store.transaction():
            for command_id in ids:
                cur = self.store._conn.execute(
                    "UPDATE commands SET delivered_at=? WHERE id=? AND delivered_at IS NULL", (now, command_id)
                )
                if cur.rowcount:
                    first.append(command_id)
        return first

    def record_ack(self, command_id: str, ack_json: str) -> bool:
        """Store rank 0's acknowledgement; False for an unknown id or one already acknowledged."""
        with self.store.transaction():
            cur = self.store._conn.execute(
                "UPDATE commands SET ack=? WHERE id=? AND ack IS NULL", (ack_json, command_id)
            )
            return bool(cur.rowcount)

    def get(self, command_id: str) -> CommandRecord | None:
        rows = self.store._query("SELECT * FROM commands WHERE id=?", [command_id])
        return _command(rows[0]) if rows else None

    def list(self, *, run: str | None = None, rule: str | None = None, since: float | None = None,
             limit: int = 100) -> list[CommandRecord]:
        where, params = _where(run=run, rule=rule)
        if since is not None:
            where.append("issued_at >= ?")
            params.append(since)
        rows = self.store._query(
            f"SELECT * FROM commands {_and(where)} ORDER BY issued_at DESC, seq DESC LIMIT ?", [*params, _limit(limit)]
        )
        return [_command(r) for r in rows]


def _where(**equal: Any) -> tuple[list[str], list[Any]]:
    clauses, params = [], []
    for column, value in equal.items():
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return clauses, params


def _and(clauses: list[str]) -> str:
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""


def _limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    return min(limit, MAX_LIMIT)
