"""train.check_config warns that the reference is a random init for every loss that has a
reference (losses.needs_reference), named directly or through loss.by_kind, and only then."""

import logging

import pytest

from configs import cdpo, dpo, ipo, sft, simpo
from stable_alignment_jax.training import losses, train

WARNING = "without checkpoint.init_from: the reference model is a random init"


def _warned(c, caplog) -> list[str]:
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.check_config(c)
  return [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


@pytest.mark.parametrize("module", [dpo, ipo, cdpo, sft, simpo])
def test_warned_for_every_reference_loss_and_only_those(module, caplog):
  c = module.get_config("tiny")
  name = c.loss.name
  got = _warned(c, caplog)
  assert got == ([f"{name} {WARNING}"] if losses.needs_reference(name) else [])
  assert losses.needs_reference("dpo") and losses.needs_reference("ipo")  # the registry's word
  assert not losses.needs_reference("sft") and not losses.needs_reference("simpo")


def test_a_reference_loss_named_by_kind_is_warned_about(caplog):
  c = sft.get_config("tiny")
  c.loss.by_kind = {"self_critic": "ipo"}
  c.loss.beta = 0.1
  assert _warned(c, caplog) == [f"ipo {WARNING}"]
