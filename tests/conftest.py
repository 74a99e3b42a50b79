"""Test session setup: 8 virtual CPU devices so every test can exercise sharding."""

import os

# The tests' programs are tiny: compiling them, not running them, is most of the suite's time.
# XLA's backend at optimisation level 0 compiles them ~30% faster (measured cold on
# test_checkpoint_format and test_device_dry: 191 -> 132 s); the matmuls are library calls
# either way. Subprocesses that set their own XLA_FLAGS start from TEST_XLA_FLAGS. Benchmarks
# and runs never load this file and keep XLA's defaults.
os.environ.setdefault("TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
# Must happen before jax is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), os.environ["TEST_XLA_FLAGS"],
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA:CPU needs ~20 s to compile a random model init (threefry + erf_inv per weight shape);
# a persistent cache shared by this session and the subprocesses it starts pays that once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
# Every program, however quick to compile: the subprocess tests start many short-lived JAX
# processes that compile the same small programs again (jax's default keeps only those >= 1 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import fcntl  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Benchmark files: the tests (and the tools they start) read ../shared/data where it exists,
# never the per-user cache a default config points at; no test fetches from the internet.
if SHARED_DATA.is_dir():
  os.environ.setdefault("STABLE_ALIGNMENT_DATA", str(SHARED_DATA))


def _real_pool():
  q = SHARED_DATA / "sandbox_questions" / "hh_questions.txt"
  p = SHARED_DATA / "hh_rlhf" / "harmless-base_test.jsonl.gz"
  return (str(q), str(p)) if q.exists() and p.exists() else None


@pytest.fixture(scope="session")
def project_pool(tmp_path_factory):
  """(question_file, prior_file) of the project-written tiny world: every clone has them."""
  from experiments.tiny_world import world
  paths = world.write(str(tmp_path_factory.mktemp("sandbox_pool")), n_questions=64,
                      n_priors=64, n_corpus_topics=20)
  return paths["questions"], paths["priors"]


@pytest.fixture
def sandbox_pool(project_pool):
  """A SANDBOX question pool and priors: the real HH questions and HH-RLHF priors where
  ../shared/data holds them, else the project-written ones."""
  return _real_pool() or project_pool


@pytest.fixture(params=["project", "shared"])
def both_pools(request, project_pool):
  """Each test twice: on the project-written pool, and on the real files (skipped without)."""
  if request.param == "project":
    return project_pool
  real = _real_pool()
  if real is None:
    pytest.skip(f"real question pool / HH-RLHF priors not found under {SHARED_DATA}")
  return real


@pytest.fixture
def shared_data():
  """Path to ../shared/data; skips the test with a reason when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real benchmark data not found at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir():
  """HF directory of the real SmolLM2-135M-Instruct (dequantized from ../shared/models' GGUF,
  cached across sessions by tests/hf_models.py); skips with a reason when the GGUF is absent."""
  import hf_models  # tests/ is on sys.path (rootdir conftest); imports torch, so only on use
  if not hf_models.SMOLLM2_GGUF.exists():
    pytest.skip(f"real model not found at {hf_models.SMOLLM2_GGUF}")
  return hf_models.smollm2_dir()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each test module's compiled programs when it ends. XLA:CPU maps every executable's
  code and data into the process (about 3 memory maps a kernel); the whole suite in one process
  passed Linux's vm.max_map_count (65530) near its end, and XLA then crashed compiling or
  serialising the next program (a segfault or abort, at a different test each run)."""
  yield
  import gc
  import jax
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _multiprocess_modules_run_alone(request):
  """Under pytest-xdist (pytest.ini runs two workers), a `multiprocess` module runs while no
  other test module does. Its local JAX processes must reach each new collective within Gloo's
  fixed 30 s of each other, and a second worker's compiles on the same 2 cores broke that.

  A readers-writer lock over two files shared by the run's workers: every module holds `main`
  shared, a multiprocess module holds it exclusive. A module takes `gate` before `main`, and a
  multiprocess module keeps `gate` while it waits, so the other worker cannot start new modules
  and starve it. Without xdist there is one process and nothing to lock."""
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if run is None:
    yield
    return
  d = pathlib.Path(tempfile.gettempdir()) / f"stable_alignment_jax-xdist-{run}"
  d.mkdir(exist_ok=True)
  alone = request.node.get_closest_marker("multiprocess") is not None
  with open(d / "gate", "a") as gate, open(d / "main", "a") as main:
    fcntl.flock(gate, fcntl.LOCK_EX)
    fcntl.flock(main, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
    if not alone:
      fcntl.flock(gate, fcntl.LOCK_UN)
    try:
      yield
    finally:
      fcntl.flock(main, fcntl.LOCK_UN)
      fcntl.flock(gate, fcntl.LOCK_UN)
