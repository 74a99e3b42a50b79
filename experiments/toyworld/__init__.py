"""A closed toy society that tests the paper's claims on CPU.

  python -m stable_alignment_jax.pipeline --config=experiments/toyworld/config.py

grammar.py     answers composed from parts along hidden alignment and engagement axes; the oracle
world.py       the world files (questions, priors, society-LM corpus with a noisy rater, SFT
               data of good answers) and the held-out evaluation items (plain, adversarial, MC)
evaluate.py    oracle scores of one system's generations and MC accuracy
experiment.py  `ToyPipeline`: the pipeline's steps plus one society per setting, seeds, methods
report.py      table (mean ± std over seeds), plots, rater accuracy, from the step ledger
"""
