"""Configs name outside code by "module:attribute": found, or one error naming the key."""

import ml_collections
import pytest

from eval import run
from experiments.tiny_world import world as tiny_world
from stable_alignment_jax import plugins


def test_load_finds_the_named_object_and_names_the_key_when_it_cannot():
  assert plugins.load("experiments.tiny_world.world:mc_items", "k") is tiny_world.mc_items
  with pytest.raises(ValueError, match=r"config world.write='nocolon': expected"):
    plugins.load("nocolon", "world.write")
  with pytest.raises(ValueError, match=r"config x='no_such_mod:f': ModuleNotFoundError"):
    plugins.load("no_such_mod:f", "x")
  with pytest.raises(ValueError, match=r"AttributeError"):
    plugins.load("experiments.tiny_world.world:nothing", "x")


def test_eval_takes_extra_tasks_from_config_only():
  with pytest.raises(KeyError, match="unknown eval task 'tiny_world_mc'"):
    run.expand_tasks("tiny_world_mc")  # eval knows no experiment by name
  c = ml_collections.ConfigDict({"data_dir": "", "extra_tasks": {"tiny_world_mc": {
      "items": "experiments.tiny_world.world:mc_items", "column": "Tiny world MC"}}})
  assert run.expand_tasks("tiny_world_mc,mic", extra=tuple(c.extra_tasks)) == \
      ["tiny_world_mc", "mic"]
  items = run.load_task("tiny_world_mc", c)
  assert [it.id for it in items] == [it.id for it in tiny_world.mc_items()]


def test_an_extra_task_gets_its_configured_column_in_the_rebuilt_table(tmp_path):
  from eval import results, table
  store = results.SystemResults(str(tmp_path / "runs" / "sys"))
  # Two items, the first scored right (label 0 has the highest log-prob), the second wrong.
  recs = [{"kind": "mc", "task": "my_mc", "id": i, "label": 0, "group": None,
           "logp_sum": lp, "n_tokens": [1, 1], "column": "My MC"}
          for i, lp in (("a", [-1.0, -2.0]), ("b", [-3.0, -1.0]))]
  store.append("my_mc", recs)
  store.mark_finished("my_mc", {"task": "my_mc", "ids": ["a", "b"]})
  col = results.rebuild_summary(store.dir)["columns"]["My MC"]
  assert (col["value"], col["n"], col["extra"]) == (0.5, 2, True)
  md = table.make_table([str(tmp_path / "runs")], str(tmp_path / "table"))
  assert md.splitlines()[0].endswith("| My MC |")
