"""An agent's internal memory: question -> accepted answer, recalled by embedding cosine.

Recall returns the most similar earlier question (and its answer) when the cosine similarity
reaches the threshold, else nothing; ties go to the earliest entry, so recall is deterministic.
"""

import numpy as np


class Memory:

  def __init__(self):
    self.questions: list[str] = []
    self.answers: list[str] = []
    self._emb: np.ndarray | None = None  # [M, D], rows L2-normalised; D set by the first add

  def __len__(self) -> int:
    return len(self.questions)

  def add(self, question: str, answer: str, embedding: np.ndarray):
    self.questions.append(question)
    self.answers.append(answer)
    row = np.asarray(embedding, np.float32)[None]
    self._emb = row if self._emb is None else np.concatenate([self._emb, row], 0)

  def embeddings(self) -> np.ndarray:
    return self._emb if self._emb is not None else np.zeros((0, 0), np.float32)

  def recall(self, query: np.ndarray, threshold: float) -> tuple[str, str, float] | None:
    if not self.questions:
      return None
    sims = self._emb @ np.asarray(query, np.float32)  # [M]
    best = int(np.argmax(sims))
    if sims[best] < threshold:
      return None
    return self.questions[best], self.answers[best], float(sims[best])
