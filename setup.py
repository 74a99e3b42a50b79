"""stable_alignment_jax: Stable Alignment (Liu et al., ICLR 2024) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="stable_alignment_jax",
    version="0.1.0",
    description="Socially aligned LMs from simulated interactions (SANDBOX + SA-CPO) in JAX",
    python_requires=">=3.10",
    packages=find_packages(include=["stable_alignment_jax*", "data_prep*", "eval*", "configs*",
                                    "experiments*"]),
    install_requires=[
        # The JAX stack moves fast; ranges are the ones this code is tested with.
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "transformers>=5.0,<6",
        "safetensors>=0.7,<0.9",
        "tokenizers>=0.22,<0.24",
        "tensorflow-datasets>=4.9.10,<4.10",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8,<0.9",
        "sentencepiece>=0.2,<0.3",
        "ml-collections>=1.1,<2",
        "absl-py>=2.3,<3",
        "numpy>=2.0,<3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
        "openai>=1.50,<4",
        "fastapi>=0.110,<1",
        "uvicorn>=0.30,<1",
        "httpx>=0.27,<1",
        # TRL-format preference data from parquet files and hub ids (preference_files.py)
        "datasets>=5.0,<6",
    ],
    entry_points={"console_scripts": [
        # `python -m <module>` runs the same code.
        "sa-train = stable_alignment_jax.main:cli",
        "sa-pipeline = stable_alignment_jax.recipes.pipeline:cli",
        "sa-sandbox = stable_alignment_jax.sandbox.__main__:cli",
        "sa-eval = eval.run:cli",
        "sa-table = eval.table:cli",
        "sa-build-data = data_prep.build:cli",
        "sa-hh-rlhf = data_prep.hh_rlhf:cli",
        "sa-tokenizer = data_prep.tokenizer:cli",
        "sa-serve = stable_alignment_jax.serve:cli",
        "sa-generate = stable_alignment_jax.serving.cli:cli",
        "sa-convert = stable_alignment_jax.convert:cli",
        "sa-plan = stable_alignment_jax.plan:cli",
        "sa-reward = stable_alignment_jax.training.reward:cli",
        "sa-ppo = stable_alignment_jax.training.ppo:cli",
    ]},
    extras_require={
        # torch only as the reference implementation in tests and benchmarks (CPU build).
        # gguf: reading the shared SmolLM2 file; import-linter: the layering contracts;
        # pytest-xdist: pytest.ini runs the suite in two workers. trl: the peers' loss code the
        # new losses are checked against; its CPO/ORPO trainers live in trl.experimental, which
        # may move between minor releases, hence the narrow range. peft: loads our exported
        # LoRA adapters onto the HF base (the format's reference reader).
        "test": ["pytest>=8,<10", "torch==2.13.0", "chex>=0.1.90,<0.2", "gguf>=0.10,<1",
                 "import-linter>=2.1,<3", "pytest-xdist>=3.6,<4", "trl>=1.16,<1.17",
                 "peft>=0.21,<0.22"],
    },
)
