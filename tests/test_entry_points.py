"""Every console script of setup.py names a function that exists, and `python -m` and the
console-script function run the same command line (flags defined once, when it runs)."""

import ast
import importlib
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _scripts() -> dict[str, str]:
  tree = ast.parse((ROOT / "setup.py").read_text())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "id", "") == "setup")
  eps = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
  return dict(tuple(x.strip() for x in e.split("=")) for e in eps["console_scripts"])


def test_console_scripts_name_real_functions_and_importing_defines_no_flags():
  from absl import flags
  scripts = _scripts()
  assert {"sa-train", "sa-pipeline", "sa-sandbox", "sa-eval", "sa-serve", "sa-convert"} <= \
      set(scripts)
  for name, target in scripts.items():
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), name
  ours = {m: [f.name for f in fs] for m, fs in flags.FLAGS.flags_by_module_dict().items()
          if m.split(".")[0] in ("stable_alignment_jax", "eval", "data_prep", "configs")}
  assert not ours  # no module of ours defines flags at import


def test_python_m_and_the_console_function_give_the_same_usage_error():
  env_cmds = [[sys.executable, "-m", "stable_alignment_jax.plan"],
              [sys.executable, "-c", "from stable_alignment_jax import plan; plan.cli()"]]
  outs = [subprocess.run(c, cwd=ROOT, capture_output=True, text=True, timeout=120)
          for c in env_cmds]
  assert all(o.returncode != 0 and "--config is required" in o.stderr for o in outs)
