"""Packaging for the diffusion RL / preference post-training engine.

The distribution is named ``nft-engine``; it installs the top-level packages ``kernels``, ``engine``,
``models``, ``train`` and ``bench``.  The import name ``kernels`` is shared with the Hugging Face Hub's
kernel loader; the distribution name and version are chosen so that diffusers' and transformers'
probes for that loader (``importlib.metadata.version("kernels")`` and a ``>= 0.18`` version check)
do not mistake this project for it (see tests/kernels/test_hub_kernels_coexist.py).
"""

from setuptools import find_packages, setup

setup(
    name="nft-engine",
    version="0.1.0",
    description="Fused kernels, a rollout engine and training loops for RL and preference "
    "post-training of diffusion and flow-matching image models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the earlier embedded checkpoints are folders of data only; listed as packages so that setuptools ships
    # them without its "importable package absent from packages" warning (an error in later setuptools)
    packages=find_packages(include=["kernels", "kernels.*", "engine", "engine.*", "models", "models.*",
                                    "train", "train.*", "bench", "bench.*"])
    + ["models.embedded.stage1", "models.embedded.stage3"],
    package_data={
        name: ["*.safetensors", "*.json"]
        for name in ("models.embedded", "models.embedded.stage1", "models.embedded.stage3")
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "diffusers>=0.32",
        # transformers 5.25 requires the Hub's `kernels` package, whose import name is this project's
        # `kernels` (diffusers then imports `kernels.CUDAProperties` from ours): stay below it until renamed
        "transformers>=4.45,<5.25",
        "peft>=0.13",
        "safetensors",
        "numpy",
        "pillow",
        "scipy",  # the GenEval-mini reward's connected components (the default reward)
        "regex",  # the hpsv2.1 reward's open_clip tokenizer pattern (transformers requires it too)
        "tqdm",
    ],
    # Everything a runtime import needs is above: .ci/run installs exactly ``pip install -e .`` in a fresh
    # virtualenv and runs the main command.  The extras are optional: engine/profiling's NVTX ranges are a
    # no-op without ``nvtx``; bench/'s pytest-benchmark files run under pytest; ``data`` is the
    # parquet reader of the Pick-a-Pic loader (its error names the extra when it is missing).
    extras_require={
        "gpu": ["flash-attn", "xformers"],
        "log": ["tensorboard", "wandb"],
        "profile": ["nvtx"],
        "bench": ["pytest", "pytest-benchmark"],
        # train.data.preference.load_pickapic reads Pick-a-Pic-style parquet files
        "data": ["pyarrow"],
        # the hpsv2.1 reward cleans prompts with ftfy.fix_text as open_clip does (without it: NFC only, a
        # warning); regex (open_clip's tokenizer pattern) already comes with transformers
        "rewards": ["ftfy"],
        # python -m train.rewards.serve (the reward server; the HTTP client reward needs only the stdlib)
        "serve": ["starlette", "uvicorn"],
        # the ocr reward's engine: PP-OCRv4 ONNX weights ship inside the wheel (no download at first use)
        "ocr": ["rapidocr-onnxruntime; python_version < '3.13'"],
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "filelock", "ruff", "pyarrow", "starlette",
                "uvicorn", "rapidocr-onnxruntime; python_version < '3.13'", "ftfy"],
    },
)
