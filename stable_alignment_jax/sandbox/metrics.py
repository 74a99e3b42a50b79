"""Per-round metrics from the store: observer scores before/after revision, the share of
revisions that improved, unparsed-rating rates, and the retry counts of the backends."""

import collections

import numpy as np


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def per_round(episodes: list[dict], step_rows: list | None = None) -> list[dict]:
  by_round = collections.defaultdict(list)
  for ep in episodes:
    by_round[ep["round"]].append(ep)
  counters = collections.defaultdict(collections.Counter)
  for r, _s, _wall, c in step_rows or []:
    counters[r].update(c)
  out = []
  for r in sorted(by_round):
    eps = by_round[r]
    ratings = [f["rating"] for ep in eps for f in ep["feedback"]]
    obs = [ep[p][f] for ep in eps for p in ("draft", "revised") for f in ("moral", "engagement")]
    pairs = [(ep["draft"]["moral"], ep["revised"]["moral"]) for ep in eps
             if ep["draft"]["moral"] is not None and ep["revised"]["moral"] is not None]
    c = counters[r]
    out.append({
        "round": r, "episodes": len(eps),
        "draft_moral": _mean(ep["draft"]["moral"] for ep in eps),
        "revised_moral": _mean(ep["revised"]["moral"] for ep in eps),
        "draft_engagement": _mean(ep["draft"]["engagement"] for ep in eps),
        "revised_engagement": _mean(ep["revised"]["engagement"] for ep in eps),
        "improved_share": (sum(b > a for a, b in pairs) / len(pairs)) if pairs else None,
        "mean_peer_rating": _mean(ratings),
        "unparsed_rating_rate": (sum(x is None for x in ratings) / len(ratings)) if ratings else None,
        "unparsed_observer_rate": (sum(x is None for x in obs) / len(obs)) if obs else None,
        "retries": {k[6:]: v for k, v in sorted(c.items()) if k.startswith("retry_")},
        "calls_made": c.get("calls_made", 0),
    })
  return out
