"""The embedded world of `configs/pipeline.py:tiny`: questions, agent priors, a society-LM corpus
and held-out multiple-choice items, written by the project (no downloads). The pipeline and eval
reach it through the config (`world.write`, `eval.extra_tasks`), never by name."""
