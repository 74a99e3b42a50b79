"""Back-Scatter: one round of social interaction for a group of central agents.

For each central agent: a question from the pool; a draft answer, written after recalling the
most similar earlier question from internal memory; up to k peers within the social radius each
return a rating 1-7 and a reason; the agent revises given the average rating and the reasons;
an observer scores draft and revision for moral alignment and engagement; the accepted answer
goes into the agent's memory. The calls of all agents are issued phase by phase, so every phase
is one batch per backend (the JAX backend turns it into one generate):

  A  drafts                     C  revisions
  B  peer feedback + observe(draft)     D  observe(revision)

How B and D read the numbers is `config.rating_mode` (judging.py): as text, or as choices over
1..7; a choice phase is a scoring batch, then one batch of the texts still to write (the
peers' reasons after their chosen ratings) and scores (engagement after the chosen moral).
"""

import collections
import dataclasses

import numpy as np

from stable_alignment_jax.sandbox import judging, world as world_lib
from stable_alignment_jax.sandbox.backends import Request


@dataclasses.dataclass
class StepContext:
  agents: list  # all agents (peers may be any of them)
  questions: list[str]
  prompts: object  # prompts.Prompts
  calls: object  # backends.replay.CallLog
  embed: object  # texts -> [N, D] L2-normalised (cached)
  cfg: object  # the run config
  counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _request(ctx: StepContext, backend: str, model: str, role: str, prompt: str, round_: int,
             agent: int, slot: int) -> Request:
  s = ctx.cfg.sampling[role]
  return Request(backend=backend, model=model, prompt=prompt, max_tokens=int(s.max_tokens),
                 temperature=float(s.temperature), top_p=float(s.top_p),
                 seed=world_lib.call_seed(ctx.cfg.seed, round_, agent, role, slot),
                 system=ctx.prompts.system)


def run_step(ctx: StepContext, round_: int, agent_ids: list[int]) -> tuple[list[dict], list]:
  """Runs Back-Scatter for `agent_ids` in `round_`.

  Returns (episodes, memory_writes); nothing is written to memory or the store here, so the
  caller can commit the step atomically. memory_writes: (agent, question, answer, embedding).
  """
  cfg, wcfg = ctx.cfg, ctx.cfg.world
  obs = cfg.observer
  centers = [ctx.agents[i] for i in agent_ids]
  questions = [ctx.questions[world_lib.question_for(len(ctx.questions), cfg.seed, round_, a.id)]
               for a in centers]
  qvecs = ctx.embed(questions)
  radius = world_lib.social_radius(wcfg)

  # A: drafts, each consulting the agent's memory.
  recalled = [a.memory.recall(v, cfg.memory.threshold) for a, v in zip(centers, qvecs)]
  reqs = [_request(ctx, a.backend, a.model, "draft",
                   ctx.prompts.draft(q, None if m is None else m[:2]), round_, a.id, 0)
          for a, q, m in zip(centers, questions, recalled)]
  drafts = [t.strip() for t in ctx.calls.complete(reqs)]

  # B: peer feedback and the observer's score of the draft, in one batch (judging.py reads
  # them as text or as choices, by config.rating_mode).
  peers = [world_lib.peers_of(ctx.agents, a, radius, wcfg.k_peers, cfg.seed, round_)
           for a in centers]
  jobs = [judging.Job("feedback", ctx.agents[p].backend, ctx.agents[p].model, q, d, a.id, slot)
          for a, q, d, ps in zip(centers, questions, drafts, peers) for slot, p in enumerate(ps)]
  jobs += [judging.Job("observe", obs.backend, obs.model, q, d, a.id, 0)
           for a, q, d in zip(centers, questions, drafts)]
  read = judging.judge(ctx, round_, jobs)
  n_fb = sum(len(ps) for ps in peers)
  draft_scores = read[n_fb:]
  feedback, i = [], 0
  for ps in peers:
    feedback.append([{"peer": p, **read[i + j]} for j, p in enumerate(ps)])
    i += len(ps)

  # C: revisions given the average rating and the reasons.
  reqs = [_request(ctx, a.backend, a.model, "revise",
                   ctx.prompts.revise(q, d, [f["rating"] for f in fb], [f["reason"] for f in fb]),
                   round_, a.id, 0)
          for a, q, d, fb in zip(centers, questions, drafts, feedback)]
  revised = [t.strip() for t in ctx.calls.complete(reqs)]

  # D: the observer scores the revision.
  revised_scores = judging.judge(ctx, round_, [
      judging.Job("observe", obs.backend, obs.model, q, r, a.id, 1)
      for a, q, r in zip(centers, questions, revised)])

  episodes, writes = [], []
  for k, a in enumerate(centers):
    dm, rm = draft_scores[k]["moral"], revised_scores[k]["moral"]
    # Keep the draft only when the observer clearly preferred it; unknown scores keep the
    # revision, which already saw the peers' feedback.
    keep_draft = (cfg.memory.accept == "better" and dm is not None and rm is not None and dm > rm)
    accepted = "draft" if keep_draft else "revised"
    episodes.append({
        "round": round_, "agent": a.id, "agent_model": a.model_label, "question": questions[k],
        "memory_question": None if recalled[k] is None else recalled[k][0],
        "draft": {"text": drafts[k], **draft_scores[k]},
        "feedback": feedback[k],
        "revised": {"text": revised[k], **revised_scores[k]},
        "accepted": accepted})
    writes.append((a.id, questions[k], drafts[k] if keep_draft else revised[k],
                   np.asarray(qvecs[k])))
  return episodes, writes
