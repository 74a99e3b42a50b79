"""The one training scaffold and the methods on it (preference stages and baselines, the reward
model, PPO), their losses, the optimizer, metrics logging and memory / FLOP budgets. Imports the
layers below it (model, data, checkpoints, sampling for PPO's rollouts); never eval, data_prep or
recipes/."""
