"""The aggregator's durable state in SQLite (standard library), in WAL mode with synchronous
FULL so a committed transaction survives a SIGKILL or a power cut.

Order of writes in a round, so that a crash at any point is safe:
1. the round's privacy charge is committed to ``ledger`` (before the noised sum leaves
   memory in any form);
2. the new bundle is written to a temporary directory and renamed into ``bundles/``;
3. ``models`` gets its row, in one transaction with the optimizer state and the round's
   status: only then is the version published.
A crash after 1 over-counts the ledger by one round (never under-counts); a crash before 3
leaves a bundle directory no row points at, which is never served and is swept at start.
A statistics round stores its released (noised) sum in ``statistics`` in the transaction that
completes it; the co-occurrence sum goes in with the model version derived from it. An
evaluation round's estimate goes in with its round's completion; ``serving`` lists the
versions sent to every device that follows the model, in turn.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcart.aggregator.privacy import Mechanism, RoundCharge
from fedcart.protocol.evaluation import Estimate

__all__ = ["ModelRow", "RoundRow", "Statistic", "Store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id   INTEGER PRIMARY KEY,
    public_key  BLOB NOT NULL UNIQUE,
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash  TEXT PRIMARY KEY,
    expires_at  REAL NOT NULL,
    used_by     INTEGER
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id     INTEGER PRIMARY KEY,
    started_at   REAL NOT NULL,
    finished_at  REAL,
    status       TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    sampled      INTEGER NOT NULL,
    survivors    INTEGER,
    detail       TEXT
);
CREATE TABLE IF NOT EXISTS ledger (
    round_id         INTEGER PRIMARY KEY,
    sampling_rate    REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    mechanism        TEXT NOT NULL,
    committed_at     REAL NOT NULL,
    sensitivity      INTEGER  -- Delta in steps of the integer noise; NULL: float noise
);
CREATE TABLE IF NOT EXISTS models (
    version     INTEGER PRIMARY KEY,
    round_id    INTEGER,
    bundle_dir  TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS statistics (
    kind        TEXT PRIMARY KEY,
    round_id    INTEGER NOT NULL,
    head        BLOB NOT NULL,
    total       BLOB NOT NULL,
    noise_std   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS estimates (
    model_version INTEGER PRIMARY KEY,
    round_id      INTEGER NOT NULL,
    estimate      TEXT NOT NULL  -- protocol.evaluation.Estimate as JSON
);
CREATE TABLE IF NOT EXISTS serving (
    version   INTEGER PRIMARY KEY,
    served_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS optimizer_state (
    version INTEGER NOT NULL,
    name    TEXT NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (version, name)
);
"""


@dataclass(frozen=True)
class ModelRow:
    version: int
    round_id: int | None
    bundle_dir: str
    manifest_sha256: str


@dataclass(frozen=True)
class Statistic:
    """A released statistic: the noised sum ``total`` over ``head`` (catalog ids; all of
    them for popularity) and the standard deviation of the noise in each entry."""

    kind: str
    round_id: int
    head: np.ndarray
    total: np.ndarray
    noise_std: float


@dataclass(frozen=True)
class RoundRow:
    round_id: int
    status: str
    model_version: int
    sampled: int
    survivors: int | None
    started_at: float
    finished_at: float | None
    detail: dict

    def secagg(self) -> str:
        """The round's SecAgg+ groups in a few words: how many, of what size, the k and t
        each used with its failure bound, and how many failed."""
        return describe_groups(self.detail.get("groups", []))


def describe_groups(groups: list[dict]) -> str:
    """One line for a round's groups (``detail["groups"]``), as status and the report show
    them: "5 x 867 devices, k=38 t=20 (failure <= 5.3e-07); 1 failed"."""
    if not groups:
        return "-"
    kinds: dict[tuple, int] = {}
    for g in groups:
        key = (g["devices"], g["k"], g["t"], g["failure_bound"])
        kinds[key] = kinds.get(key, 0) + 1
    parts = [f"{count} x {n} devices, k={k} t={t}" + (
        f" (failure <= {bound:.1e})" if bound == bound else "")  # NaN: k was configured
             for (n, k, t, bound), count in kinds.items()]
    failed = sum(g["status"] != "completed" for g in groups)
    return "; ".join(parts) + (f"; {failed} failed" if failed else "")


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(ledger)")}
        if "sensitivity" not in columns:  # a ledger from before integer noise
            self.db.execute("ALTER TABLE ledger ADD COLUMN sensitivity INTEGER")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- enrollment --------------------------------------------------------------------
    def enroll(self, public_key: bytes) -> int:
        """The client id of ``public_key``, enrolling it if new."""
        return self.enroll_many([public_key])[0]

    def enroll_many(self, public_keys: list[bytes]) -> list[int]:
        """Client ids of ``public_keys``, enrolling the new ones in one transaction."""
        if any(len(k) != 32 for k in public_keys):
            raise ValueError("a device key is a 32-byte Ed25519 public key")
        ids = []
        with self.transaction() as db:
            for key in public_keys:
                row = db.execute("SELECT client_id FROM clients WHERE public_key = ?",
                                 (key,)).fetchone()
                if row is None:
                    row = (db.execute("INSERT INTO clients (public_key, enrolled_at) "
                                      "VALUES (?, ?)", (key, time.time())).lastrowid,)
                ids.append(int(row[0]))
        return ids

    def client_of(self, public_key: bytes) -> int | None:
        row = self.db.execute("SELECT client_id FROM clients WHERE public_key = ?",
                              (public_key,)).fetchone()
        return None if row is None else int(row[0])

    def enrolled(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM clients").fetchone()[0])

    def issue_token(self, ttl: float = 86400.0) -> str:
        """A one-time enrollment token; only its hash is stored."""
        token = secrets.token_urlsafe(24)
        with self.transaction() as db:
            db.execute("INSERT INTO tokens (token_hash, expires_at) VALUES (?, ?)",
                       (hashlib.sha256(token.encode()).hexdigest(), time.time() + ttl))
        return token

    def redeem_token(self, token: str, public_key: bytes) -> int | None:
        """Enroll ``public_key`` with an unused, unexpired token; None if the token is bad."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.transaction() as db:
            row = db.execute("SELECT expires_at, used_by FROM tokens WHERE token_hash = ?",
                             (digest,)).fetchone()
            if row is None or row[1] is not None or row[0] < time.time():
                return None
            existing = db.execute("SELECT client_id FROM clients WHERE public_key = ?",
                                  (public_key,)).fetchone()
            if existing:
                client_id = int(existing[0])
            else:
                cur = db.execute("INSERT INTO clients (public_key, enrolled_at) VALUES (?, ?)",
                                 (public_key, time.time()))
                client_id = int(cur.lastrowid or 0)
            db.execute("UPDATE tokens SET used_by = ? WHERE token_hash = ?", (client_id, digest))
        return client_id

    # -- rounds and the ledger -------------------------------------------------------------
    def next_round_id(self) -> int:
        row = self.db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        return int(row[0] or 0) + 1

    def start_round(self, round_id: int, model_version: int, sampled: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO rounds (round_id, started_at, status, model_version, "
                       "sampled) VALUES (?, ?, 'running', ?, ?)",
                       (round_id, time.time(), model_version, sampled))

    def finish_round(self, round_id: int, status: str, survivors: int | None,
                     detail: dict) -> None:
        with self.transaction() as db:
            db.execute("UPDATE rounds SET status = ?, survivors = ?, finished_at = ?, "
                       "detail = ? WHERE round_id = ?",
                       (status, survivors, time.time(), json.dumps(detail), round_id))

    def abandon_running_rounds(self) -> list[int]:
        """At start: rounds a crash interrupted. Their charges, if any, stay in the ledger."""
        with self.transaction() as db:
            ids = [int(r[0]) for r in db.execute(
                "SELECT round_id FROM rounds WHERE status = 'running'")]
            db.execute("UPDATE rounds SET status = 'interrupted', finished_at = ? "
                       "WHERE status = 'running'", (time.time(),))
        return ids

    def charge(self, charge: RoundCharge) -> None:
        """Commit a round's privacy cost; done before its result leaves memory."""
        with self.transaction() as db:
            db.execute("INSERT INTO ledger (round_id, sampling_rate, noise_multiplier, "
                       "mechanism, committed_at, sensitivity) VALUES (?, ?, ?, ?, ?, ?)",
                       (charge.round_id, charge.sampling_rate, charge.noise_multiplier,
                        charge.mechanism.value, time.time(), charge.sensitivity))

    def ledger(self) -> list[RoundCharge]:
        return [RoundCharge(int(r[0]), float(r[1]), float(r[2]), Mechanism(r[3]),
                            None if r[4] is None else int(r[4]))
                for r in self.db.execute("SELECT round_id, sampling_rate, noise_multiplier, "
                                         "mechanism, sensitivity FROM ledger "
                                         "ORDER BY round_id")]

    def rounds(self) -> list[RoundRow]:
        return [RoundRow(int(r[0]), r[1], int(r[2]), int(r[3]), r[4], r[5], r[6],
                         json.loads(r[7] or "{}"))
                for r in self.db.execute("SELECT round_id, status, model_version, sampled, "
                                         "survivors, started_at, finished_at, detail FROM "
                                         "rounds ORDER BY round_id")]

    # -- statistics ------------------------------------------------------------------------
    def _insert_statistic(self, db: sqlite3.Connection, stat: Statistic) -> None:
        db.execute("INSERT INTO statistics (kind, round_id, head, total, noise_std) VALUES "
                   "(?, ?, ?, ?, ?)", (stat.kind, stat.round_id,
                                      np.asarray(stat.head, "<i8").tobytes(),
                                      np.asarray(stat.total, "<f8").tobytes(), stat.noise_std))

    def record_statistic(self, stat: Statistic, survivors: int, detail: dict) -> None:
        """Store a released statistic and complete its round, in one transaction."""
        with self.transaction() as db:
            self._insert_statistic(db, stat)
            self._complete_round(db, stat.round_id, survivors, detail)

    def released(self) -> set[str]:
        """The kinds of statistic released so far (without reading their sums)."""
        return {kind for (kind,) in self.db.execute("SELECT kind FROM statistics")}

    def statistic(self, kind: str) -> Statistic | None:
        row = self.db.execute("SELECT round_id, head, total, noise_std FROM statistics WHERE "
                              "kind = ?", (kind,)).fetchone()
        if row is None:
            return None
        return Statistic(kind, int(row[0]), np.frombuffer(row[1], "<i8").copy(),
                         np.frombuffer(row[2], "<f8").copy(), float(row[3]))

    # -- evaluation ------------------------------------------------------------------------
    def record_estimate(self, estimate: Estimate, round_id: int, survivors: int,
                        detail: dict) -> None:
        """Store an evaluation round's estimate and complete the round, in one transaction."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO estimates (model_version, round_id, estimate) "
                       "VALUES (?, ?, ?)", (estimate.model_version, round_id,
                                            json.dumps(estimate.to_json())))
            self._complete_round(db, round_id, survivors, detail)

    def estimates(self) -> list[Estimate]:
        """Every estimate, by model version."""
        return [Estimate.from_json(json.loads(raw)) for (raw,) in self.db.execute(
            "SELECT estimate FROM estimates ORDER BY model_version")]

    def estimate(self, version: int) -> Estimate | None:
        row = self.db.execute("SELECT estimate FROM estimates WHERE model_version = ?",
                              (version,)).fetchone()
        return None if row is None else Estimate.from_json(json.loads(row[0]))

    def trained_rounds(self) -> int:
        """How many training rounds have completed (reads every round: the service counts
        once, at start)."""
        return sum(1 for r in self.rounds()
                   if r.status == "completed" and r.detail.get("task") == "train")

    def serve(self, version: int) -> None:
        """Record that ``version`` goes to every device that follows the model."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO serving (version, served_at) VALUES (?, ?)",
                       (version, time.time()))

    def serving_version(self) -> int | None:
        row = self.db.execute("SELECT MAX(version) FROM serving").fetchone()
        return None if row[0] is None else int(row[0])

    # -- models ----------------------------------------------------------------------------
    @staticmethod
    def _complete_round(db: sqlite3.Connection, round_id: int, survivors: int | None,
                        detail: dict) -> None:
        db.execute("UPDATE rounds SET status = 'completed', survivors = ?, finished_at = ?, "
                   "detail = ? WHERE round_id = ?",
                   (survivors, time.time(), json.dumps(detail), round_id))

    def publish(self, row: ModelRow, optimizer_state: dict[str, np.ndarray],
                round_id: int | None, survivors: int | None, detail: dict,
                statistic: Statistic | None = None) -> None:
        """Make a written bundle the current model, with its optimizer state, the round's
        outcome and the statistic it was derived from (if any), in one transaction."""
        with self.transaction() as db:
            if statistic is not None:
                self._insert_statistic(db, statistic)
            db.execute("INSERT INTO models (version, round_id, bundle_dir, manifest_sha256, "
                       "created_at) VALUES (?, ?, ?, ?, ?)",
                       (row.version, row.round_id, row.bundle_dir, row.manifest_sha256,
                        time.time()))
            for name, value in optimizer_state.items():
                db.execute("INSERT INTO optimizer_state (version, name, data) VALUES (?, ?, ?)",
                           (row.version, name, np.asarray(value, "<f8").tobytes()))
            if round_id is not None:
                self._complete_round(db, round_id, survivors, detail)

    def latest_model(self) -> ModelRow | None:
        row = self.db.execute("SELECT version, round_id, bundle_dir, manifest_sha256 FROM "
                              "models ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else ModelRow(int(row[0]), row[1], row[2], row[3])

    def models(self) -> list[ModelRow]:
        return [ModelRow(int(r[0]), r[1], r[2], r[3]) for r in self.db.execute(
            "SELECT version, round_id, bundle_dir, manifest_sha256 FROM models ORDER BY version")]

    def optimizer_state(self, version: int) -> dict[str, np.ndarray]:
        return {name: np.frombuffer(data, "<f8").copy() for name, data in self.db.execute(
            "SELECT name, data FROM optimizer_state WHERE version = ?", (version,))}

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
