"""A closed toy society that tests the paper's claims on CPU.

  python -m stable_alignment_jax.recipes.pipeline --config=experiments/toyworld/config.py

grammar.py     answers composed from parts along hidden alignment and engagement axes; the oracle
world.py       the world files (questions, priors, society-LM corpus with a noisy rater and
               half-misaligned plain answers, SFT data of good answers) and the held-out
               evaluation items (plain, HH-A in the paper's layout, revise prompts with a
               misaligned draft, MC, one-detail MC pairs)
evaluate.py    oracle scores of one system's generations (alignment among parsed answers,
               parsed / aligned / misaligned shares), Stage 3's revision skill, MC accuracy
experiment.py  `ToyPipeline`: per seed, one society per setting rerun with that seed, its pooled
               data, and every method (SFT, DPO, IL, IL step-matched to IL+SC+RA, IL+SC and
               IL+SC+RA with and without replay, mixed 5:1:1, PPO) trained on it with that seed
report.py      from the step ledger: table (mean ± std over seeds), paired comparisons across
               seeds, raters and societies per seed, plots
"""
