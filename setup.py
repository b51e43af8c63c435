"""llama_hk: LLaMA in JAX and dm-haiku, wired by gin-config, driven by absl binaries."""

import setuptools

# Ranges, for projects that embed the package; constraints.txt pins the exact versions the suite last passed with
# (`pip install -c constraints.txt -e ".[test]"`): dm-haiku follows JAX releases late.

INSTALL_REQUIRES = [
    # The model, its parameters and the optimizer.
    "jax>=0.4.35",
    "dm-haiku>=0.0.13",
    "optax>=0.2.3",
    "numpy>=1.26",
    "ml_dtypes>=0.4",  # bfloat16 as a NumPy dtype, for streaming conversion without a framework.
    # Wiring and binaries.
    "gin-config>=0.5",
    "absl-py>=2.0",
    # The project's own checkpoint format (sharded, async, restores straight into a mesh layout).
    "orbax-checkpoint>=0.12.8,<0.13",  # Its partial (leaf-by-leaf) save streams conversion; pinned as it is new API.
    # Reading and writing Hugging Face checkpoints tensor by tensor, without torch.
    "safetensors>=0.4",
    # GGUF files (llama.cpp): metadata, tokenizer and the dequantization kernels.
    "gguf>=0.10",
    # Tokenizers: LLaMA-1/2 `tokenizer.model` and the `tokenizer.json` of LLaMA-3 and SmolLM2.
    "sentencepiece>=0.2",
    "tokenizers>=0.19",
    "jinja2>=3.1",  # chat templates carried by tokenizer configs.
    # Data: TFDS as the dataset layer (array_record, no TensorFlow), grain as the input pipeline.
    "tensorflow-datasets>=4.9.7",
    "array_record>=0.5",
    "grain>=0.2.2",
    "importlib_resources",  # TFDS imports it to prepare builders in a package, declaring it only for Python < 3.9.
    # Training curves as TensorBoard event files without TensorFlow (t5x and MaxText write the same scalars).
    "tensorboardX>=2.6",
    "matplotlib>=3.8",  # bin/train redraws model_dir/curves.png after each evaluation; bin/plot compares runs.
]

EVAL_REQUIRES = [
    # bin/eval --tasks: lm-evaluation-harness, the field's task suite, run on this project's model class.
    "lm-eval>=0.4.9",
]

SERVE_REQUIRES = [
    # bin/serve: the OpenAI-style HTTP API. FastAPI (with uvicorn as its ASGI server) is what the ecosystem's
    # OpenAI-compatible servers use, `transformers serve` among them.
    "fastapi>=0.110",
    "uvicorn>=0.29",
]

TEST_REQUIRES = [
    *SERVE_REQUIRES,
    *EVAL_REQUIRES,
    "openai>=1.30",  # The official client: the serving tests speak to bin/serve only through it.
    # The harness's `local-completions` model (lm-eval's [api] extra) scores the test tasks through bin/serve.
    "lm-eval[api]>=0.4.9",
    "peft>=0.11",  # The reference for LoRA: adapters written here must load in peft, and peft's here.
    # llama.cpp itself, built from source: its quantizer makes the K-quant test files and its runtime loads, tokenizes
    # and scores the GGUF files bin/convert writes. README's test command builds it portably (CMAKE_ARGS).
    "llama-cpp-python>=0.3.16",
    # References only: transformers' PyTorch LLaMA is the independent implementation we compare against.
    "torch==2.13.0",  # Pinned: its CPU wheel is what this project tests with; other versions pull CUDA builds.
    "transformers>=5.0",  # The tests read its v5 API (`dtype=`, `config.rope_parameters`).
    "accelerate>=0.30",  # transformers' GGUF loader needs it.
    "pytest>=8",
    "pytest-xdist>=3.5",  # README's test command runs two test files at a time (`-n 2 --dist loadfile`).
]

setuptools.setup(
    name="llama_hk",
    version="0.1.0",
    description=__doc__,
    packages=[*setuptools.find_packages(include=["llama_hk", "llama_hk.*"]), "llama_hk.gin"],
    # gin/ stays at the top of the checkout and installs as llama_hk/gin, where `--gin_file=gin/...` and
    # `include 'gin/...'` find it outside a checkout (llama_hk.cli.gin_config).
    package_dir={"llama_hk.gin": "gin"},
    package_data={"llama_hk.gin": ["**/*.gin"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"serve": SERVE_REQUIRES, "eval": EVAL_REQUIRES, "test": TEST_REQUIRES},
)
