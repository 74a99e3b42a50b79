"""A SANDBOX agent: a grid position, a model (backend + model name), a prior kind and memory."""

import dataclasses

from stable_alignment_jax.sandbox.memory import Memory


@dataclasses.dataclass
class Agent:
  id: int
  x: int
  y: int
  backend: str  # a name in config.backends
  model: str  # the model name sent to that backend
  prior_kind: str  # good | bad | mixed: which prior answers seeded the memory
  memory: Memory

  @property
  def model_label(self) -> str:
    """The `agent_model` of the export: backend and model, e.g. `vllm/llama-2-7b`."""
    return f"{self.backend}/{self.model}"

  def distance(self, other: "Agent") -> float:
    return ((self.x - other.x) ** 2 + (self.y - other.y) ** 2) ** 0.5
