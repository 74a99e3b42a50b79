"""PNG curves over rounds: observer moral/engagement of drafts and revisions, the share of
revisions that improved and the unparsed-rating rate (the paper shows alignment rising with
interaction)."""

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_rounds(rows: list[dict], out_path: str, title: str = "SANDBOX") -> None:
  rounds = [r["round"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

  def line(ax, key, label, style="-"):
    ys = [float("nan") if r[key] is None else r[key] for r in rows]
    ax.plot(rounds, ys, style, marker="o", label=label)

  line(axes[0], "draft_moral", "draft", "--")
  line(axes[0], "revised_moral", "revised")
  axes[0].set(title="observer moral score", xlabel="round", ylim=(1, 7))
  line(axes[1], "draft_engagement", "draft", "--")
  line(axes[1], "revised_engagement", "revised")
  axes[1].set(title="observer engagement", xlabel="round", ylim=(1, 7))
  line(axes[2], "improved_share", "revision improved")
  line(axes[2], "unparsed_rating_rate", "unparsed peer ratings", ":")
  axes[2].set(title="shares", xlabel="round", ylim=(0, 1))
  for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
