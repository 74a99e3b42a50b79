"""The layering of pyproject.toml's import-linter contracts holds, and the checker catches a
break; no module reaches into another's private names; no module-level import cycle at all."""

import ast
import pathlib
import shutil
import subprocess
import sys

import grimp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("stable_alignment_jax", "eval", "data_prep", "configs", "experiments")
LINT = str(pathlib.Path(sys.executable).with_name("lint-imports"))


def _lint(cwd):
  return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                        timeout=120, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin",
                                          "COLUMNS": "250"})  # one import chain per line


def test_contracts_are_kept():
  r = _lint(ROOT)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
  assert "11 kept, 0 broken" in r.stdout


def _planted(tmp_path, plants: dict[str, str]):
  """lint-imports over a copy of the tree with each line appended to its module's file."""
  for pkg in PACKAGES:
    shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(ROOT / "pyproject.toml", tmp_path)
  for module, line in plants.items():
    path = tmp_path / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
  return _lint(tmp_path)


def test_a_forbidden_import_breaks_its_contract(tmp_path):
  r = _planted(tmp_path, {"stable_alignment_jax.model.llama":
                          "from stable_alignment_jax.data import tokenizer"})
  assert r.returncode != 0
  assert "model imports nothing else of ours BROKEN" in r.stdout
  assert "stable_alignment_jax.model.llama -> stable_alignment_jax.data.tokenizer" in r.stdout


# One planted import per contract (new with the layer packages, or whose scope they changed):
# (importer, imported, the contract it must break). Planted all at once: one lint run.
PLANTS = [
    ("stable_alignment_jax.runtime", "stable_alignment_jax.data.tokenizer",
     "contracts, runtime and plugins import nothing of ours"),
    ("stable_alignment_jax.training.losses", "stable_alignment_jax.training.optim",
     "losses import nothing of ours"),
    ("stable_alignment_jax.checkpoints.run_dir", "stable_alignment_jax.sampling.generate",
     "the layers, top to bottom as listed"),
    ("stable_alignment_jax.serving.batcher", "stable_alignment_jax.training.scaffold",
     "sampling and serving never import training"),
    ("stable_alignment_jax.sampling.generate", "stable_alignment_jax.training.losses",
     "sampling and serving never import training"),
    ("stable_alignment_jax.sandbox.world", "stable_alignment_jax.training.train",
     "sandbox never imports training"),
    ("stable_alignment_jax.training.train", "eval.run",
     "the library core never imports eval, data_prep or the recipes"),
    ("stable_alignment_jax.data.loader", "data_prep.build",
     "the library core never imports eval, data_prep or the recipes"),
    ("stable_alignment_jax.serve", "stable_alignment_jax.recipes.pipeline",
     "the library core never imports eval, data_prep or the recipes"),
    ("stable_alignment_jax.recipes.rlhf", "stable_alignment_jax.main",
     "nothing imports the entry points"),
]


def test_a_planted_import_breaks_each_contract(tmp_path):
  plants = {}
  for importer, imported, _ in PLANTS:
    parent, name = imported.rsplit(".", 1)
    plants[importer] = plants.get(importer, "") + f"\nfrom {parent} import {name}"
  r = _planted(tmp_path, {m: lines.strip().replace("\n", "  # noqa\n") for m, lines in
                          plants.items()})
  assert r.returncode != 0
  for importer, imported, contract in PLANTS:
    assert f"{contract} BROKEN" in r.stdout, contract
    assert f"{importer} -> {imported}" in r.stdout, (importer, imported)
  # the unplanted ones still hold
  for contract in ("data_prep reads the SANDBOX export file, never sandbox modules",
                   "the library never imports the experiments"):
    assert f"{contract} KEPT" in r.stdout


def _modules():
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      yield path


def test_no_private_name_is_imported_across_modules():
  bad = []
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and \
         node.module.split(".")[0] in PACKAGES:
        bad += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                for a in node.names if a.name.startswith("_")]
  assert not bad, bad


def test_no_private_attribute_of_an_imported_module_is_used():
  bad = []
  for path in _modules():
    tree = ast.parse(path.read_text())
    ours = set()  # names bound to our modules by `from pkg import module` / `import pkg.mod as m`
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and \
         node.module.split(".")[0] in PACKAGES:
        ours |= {a.asname or a.name for a in node.names}
      elif isinstance(node, ast.Import):
        ours |= {a.asname for a in node.names if a.asname and a.name.split(".")[0] in PACKAGES}
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
         node.value.id in ours and node.attr.startswith("_") and not node.attr.startswith("__"):
        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
  assert not bad, bad


def test_no_module_level_import_cycle():
  """acyclic_siblings checks packages level by level; this checks every module pair, across
  the top-level packages too."""
  g = grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)
  cycles = []
  for a in sorted(g.modules):
    for b in sorted(g.find_modules_directly_imported_by(a)):
      back = g.find_shortest_chain(importer=b, imported=a)
      if back:
        cycles.append(" -> ".join((a,) + tuple(back)))
  assert not cycles, cycles[:5]
