"""The run store: one SQLite file per run, in WAL mode.

Everything a run needs to continue lives here: the config (JSON), the agents, their memories,
the finished episodes with their feedback, the call log (record/replay), an embedding cache and
the list of completed steps. A step's episodes, memory writes and step marker are committed in
one transaction, so a kill leaves either the whole step or none of it; the primary keys make a
duplicated episode an error instead of a silent second copy.
"""

import json
import sqlite3
import time
from typing import Any, Iterable

import numpy as np

SCHEMA_VERSION = 2  # 2: `details` (how each score was read) on episodes and feedback

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
  id INTEGER PRIMARY KEY, x INTEGER NOT NULL, y INTEGER NOT NULL,
  backend TEXT NOT NULL, model TEXT NOT NULL, prior_kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
  agent INTEGER NOT NULL, seq INTEGER NOT NULL, question TEXT NOT NULL, answer TEXT NOT NULL,
  embedding BLOB NOT NULL, round INTEGER NOT NULL, PRIMARY KEY (agent, seq));
CREATE TABLE IF NOT EXISTS episodes (
  round INTEGER NOT NULL, agent INTEGER NOT NULL, agent_model TEXT NOT NULL,
  question TEXT NOT NULL, memory_question TEXT,
  draft_text TEXT NOT NULL, draft_moral REAL, draft_engagement REAL,
  revised_text TEXT NOT NULL, revised_moral REAL, revised_engagement REAL,
  accepted TEXT NOT NULL, details TEXT, PRIMARY KEY (round, agent));
CREATE TABLE IF NOT EXISTS feedback (
  round INTEGER NOT NULL, agent INTEGER NOT NULL, slot INTEGER NOT NULL, peer INTEGER NOT NULL,
  rating INTEGER, reason TEXT NOT NULL, details TEXT, PRIMARY KEY (round, agent, slot));
CREATE TABLE IF NOT EXISTS calls (
  key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL, prompt TEXT NOT NULL,
  params TEXT NOT NULL, seed INTEGER NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
  embedder TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (embedder, text));
CREATE TABLE IF NOT EXISTS steps (
  round INTEGER NOT NULL, step INTEGER NOT NULL, wall_s REAL NOT NULL, counters TEXT NOT NULL,
  finished_at REAL NOT NULL, PRIMARY KEY (round, step));
"""


def _vec_to_blob(v: np.ndarray) -> bytes:
  return np.asarray(v, np.float32).tobytes()


def _blob_to_vec(b: bytes) -> np.ndarray:
  return np.frombuffer(b, np.float32).copy()


class Store:
  """A thin, explicit layer over sqlite3; callers group writes with `transaction()`."""

  def __init__(self, path: str, *, create: bool = False):
    import os
    if not create and not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such run store (start one with `sandbox run`)")
    self.path = path
    # isolation_level=None: we issue BEGIN/COMMIT ourselves so a step is exactly one transaction.
    self.db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    self.db.execute("PRAGMA journal_mode=WAL")
    self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process kills
    self.db.executescript(_SCHEMA)
    if create:
      self.set_meta("schema_version", SCHEMA_VERSION)
    else:
      version = self.get_meta("schema_version")
      if version == 1:  # a run started before `details`: the columns are added, rows stay null
        for table in ("episodes", "feedback"):
          cols = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
          if "details" not in cols:
            self.db.execute(f"ALTER TABLE {table} ADD COLUMN details TEXT")
        self.set_meta("schema_version", SCHEMA_VERSION)
        version = SCHEMA_VERSION
      if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: store schema version {version}, this code reads {SCHEMA_VERSION}")

  def close(self):
    self.db.close()

  def transaction(self):
    return _Transaction(self.db)

  # --- meta --------------------------------------------------------------------------------
  def set_meta(self, key: str, value: Any):
    self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

  def get_meta(self, key: str, default: Any = None) -> Any:
    row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else json.loads(row[0])

  # --- agents and memories -----------------------------------------------------------------
  def add_agent(self, agent_id: int, x: int, y: int, backend: str, model: str, prior_kind: str):
    self.db.execute("INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?)",
                    (agent_id, x, y, backend, model, prior_kind))

  def agents(self) -> list[tuple]:
    return self.db.execute("SELECT id, x, y, backend, model, prior_kind FROM agents "
                           "ORDER BY id").fetchall()

  def add_memory(self, agent: int, seq: int, question: str, answer: str, embedding: np.ndarray,
                 round_: int):
    self.db.execute("INSERT INTO memories VALUES (?, ?, ?, ?, ?, ?)",
                    (agent, seq, question, answer, _vec_to_blob(embedding), round_))

  def memories(self) -> Iterable[tuple]:
    for agent, seq, q, a, emb, r in self.db.execute(
        "SELECT agent, seq, question, answer, embedding, round FROM memories ORDER BY agent, seq"):
      yield agent, seq, q, a, _blob_to_vec(emb), r

  # --- episodes ------------------------------------------------------------------------------
  def add_episode(self, ep: dict):
    """`ep` in the back_scatter layout; the optional export fields beside a score (its source,
    distribution, expected value) go into the JSON `details` column."""
    d, v = ep["draft"], ep["revised"]
    details = {part: _details(ep[part], ("text", "moral", "engagement"))
               for part in ("draft", "revised")}
    self.db.execute(
        "INSERT INTO episodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (ep["round"], ep["agent"], ep["agent_model"], ep["question"], ep.get("memory_question"),
         d["text"], d["moral"], d["engagement"], v["text"], v["moral"], v["engagement"],
         ep["accepted"], _json_or_none({k: x for k, x in details.items() if x})))
    for slot, fb in enumerate(ep["feedback"]):
      self.db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (ep["round"], ep["agent"], slot, fb["peer"], fb["rating"], fb["reason"],
                       _json_or_none(_details(fb, ("peer", "rating", "reason")))))

  def episodes(self) -> list[dict]:
    """All episodes ordered by (round, agent), in the DESIGN.md export layout (minus run_id);
    a score read before `details` existed has no source fields."""
    feedback: dict = {}
    for r, a, _slot, peer, rating, reason, det in self.db.execute(
        "SELECT round, agent, slot, peer, rating, reason, details FROM feedback "
        "ORDER BY round, agent, slot"):
      fb = {"peer": peer, "rating": rating, **_loads(det), "reason": reason}
      feedback.setdefault((r, a), []).append(fb)
    out = []
    for row in self.db.execute(
        "SELECT round, agent, agent_model, question, draft_text, draft_moral, draft_engagement, "
        "revised_text, revised_moral, revised_engagement, details FROM episodes "
        "ORDER BY round, agent"):
      r, a, model, q, dt, dm, de, rt, rm, re_, det = row
      det = _loads(det)
      out.append({"round": r, "agent": a, "agent_model": model, "question": q,
                  "draft": _answer(dt, dm, de, det.get("draft", {})),
                  "feedback": feedback.get((r, a), []),
                  "revised": _answer(rt, rm, re_, det.get("revised", {}))})
    return out

  # --- steps ---------------------------------------------------------------------------------
  def mark_step(self, round_: int, step: int, wall_s: float, counters: dict):
    self.db.execute("INSERT INTO steps VALUES (?, ?, ?, ?, ?)",
                    (round_, step, wall_s, json.dumps(counters, sort_keys=True), time.time()))

  def completed_steps(self) -> set[tuple[int, int]]:
    return {(r, s) for r, s in self.db.execute("SELECT round, step FROM steps")}

  def step_rows(self) -> list[tuple[int, int, float, dict]]:
    return [(r, s, w, json.loads(c)) for r, s, w, c in
            self.db.execute("SELECT round, step, wall_s, counters FROM steps ORDER BY round, step")]

  # --- call log and embedding cache ---------------------------------------------------------
  def add_calls(self, rows: list[tuple]):
    """rows: (key, backend, model, prompt, params_json, seed, text); a key seen before is kept."""
    self.db.executemany("INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

  def lookup_calls(self, keys: list[str]) -> dict[str, str]:
    out = {}
    for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
      chunk = keys[i:i + 500]
      marks = ",".join("?" * len(chunk))
      out.update(self.db.execute(f"SELECT key, text FROM calls WHERE key IN ({marks})", chunk))
    return out

  def count(self, table: str) -> int:
    assert table in ("agents", "memories", "episodes", "feedback", "calls", "steps", "embeddings")
    return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

  def add_embeddings(self, embedder: str, pairs: list[tuple[str, np.ndarray]]):
    self.db.executemany("INSERT OR IGNORE INTO embeddings VALUES (?, ?, ?)",
                        [(embedder, t, _vec_to_blob(v)) for t, v in pairs])

  def lookup_embeddings(self, embedder: str, texts: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for i in range(0, len(texts), 500):
      chunk = texts[i:i + 500]
      marks = ",".join("?" * len(chunk))
      for t, b in self.db.execute(
          f"SELECT text, vector FROM embeddings WHERE embedder = ? AND text IN ({marks})",
          [embedder, *chunk]):
        out[t] = _blob_to_vec(b)
    return out


def _details(obj: dict, plain: tuple) -> dict:
  return {k: v for k, v in obj.items() if k not in plain}


def _json_or_none(d: dict) -> str | None:
  return json.dumps(d) if d else None


def _loads(text: str | None) -> dict:
  return json.loads(text) if text else {}


def _answer(text: str, moral, engagement, det: dict) -> dict:
  """An answer in the export's field order: each score followed by its own details."""
  out = {"text": text}
  for field, value in (("moral", moral), ("engagement", engagement)):
    out[field] = value
    out.update({k: v for k, v in det.items() if k.startswith(field + "_")})
  return out


class _Transaction:

  def __init__(self, db):
    self.db = db

  def __enter__(self):
    self.db.execute("BEGIN IMMEDIATE")
    return self

  def __exit__(self, exc_type, exc, tb):
    self.db.execute("ROLLBACK" if exc_type else "COMMIT")
    return False
