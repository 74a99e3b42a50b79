"""TFDS builder `sandbox_alignment`: the three kinds of alignment examples as array_record datasets.

Configs `imitation`, `self_critic`, `realignment`; splits `train` / `validation` by a hash of the
question (`alignment_examples.split_of`), so no question is in both splits of any config.
Read back with `tfds.data_source("sandbox_alignment/imitation", data_dir=OUT, split="train")`
(no TensorFlow, and this module need not be imported: tfds reads the stored metadata).

`data_prep.build.build` (`python -m data_prep.build`) writes through the fast writer of
`tfds_writer`; `SandboxAlignment(splits=..., ...).download_and_prepare(file_format=
"array_record")` is the plain tfds path to the same features (slower, ~0.5 ms per example, and
it needs the `importlib_resources` package, which we do not install).
"""

import tensorflow_datasets as tfds

from data_prep import alignment_examples as ax
from data_prep import tfds_writer

SPLITS = ("train", "validation")


class SandboxAlignment(tfds.core.GeneratorBasedBuilder):
  """SANDBOX interaction records -> prompt + K rated responses (Liu et al., ICLR 2024)."""

  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {"1.0.0": "Imitation, self-critic and realignment examples; Alpaca prompts.",
                   "1.1.0": "`turns`: the prompt as a chat user turn, for chat templates.",
                   "1.2.0": "self-critic responses start with \"Critique: \".",
                   "1.3.0": "realignment as the authors build it: question + draft + request "
                            "as one instruction, one response per rated peer reason (reason, "
                            "the marker, the revision); the bulleted form is an option."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="imitation", description="question -> answers rated by the "
                              "observer's moral score"),
      tfds.core.BuilderConfig(name="self_critic", description="question + critique instruction "
                              "+ draft -> peer reasons rated by the peers"),
      tfds.core.BuilderConfig(name="realignment", description="question + draft + revise "
                              "instruction -> one (peer reason + revision) per rated peer, improved and above 4 only"),
  ]

  def __init__(self, *, splits: dict[str, list[dict]] | None = None, **kwargs):
    self._splits = splits
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=tfds_writer.features(),
        homepage="https://arxiv.org/abs/2305.16960")

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._splits is None:
      raise ValueError("sandbox_alignment is built from SANDBOX exports: run "
                       "`python -m data_prep.build --export=... --out=...`")
    return {name: self._generate_examples(exs) for name, exs in self._splits.items()}

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      yield i, {k: ex[k] for k in tfds_writer.FEATURE_NAMES}


def split_examples(examples: list[dict], validation_percent: float) -> dict[str, list[dict]]:
  out = {s: [] for s in SPLITS}
  for ex in examples:
    out[ax.split_of(ex["question"], validation_percent)].append(ex)
  return out
