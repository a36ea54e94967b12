"""pixart_fast: fast PixArt-alpha training. See README.md."""
from setuptools import setup

setup(
    name="pixart_fast",
    version="0.1.0",
    description="Fast PixArt-alpha text-to-image training: a lean model, Triton kernels, a three-stage trainer",
    python_requires=">=3.10",
    # docs/ARCHITECTURE.md section 3: kernels/ and train/ are imported as pixart_fast.kernels and pixart_fast.train.
    # Never install a top-level `kernels` module: transformers probes for Hugging Face's package of that name.
    packages=["pixart_fast", "pixart_fast.kernels", "pixart_fast.train"],
    package_dir={"pixart_fast": "pixart_fast", "pixart_fast.kernels": "kernels", "pixart_fast.train": "train"},
    install_requires=[
        "torch>=2.5,<2.15",
        "triton>=3.1; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "transformers>=4.56",
        "diffusers>=0.30",  # AutoencoderKL for feature extraction and sampling with a VAE
        "pillow",
        "tqdm",
        "matplotlib",  # the ablation's plot (python -m pixart_fast.train.ablate)
        "peft>=0.14",  # LoRA fine-tuning (--lora-rank) and its adapters for diffusers
        "came-pytorch",  # the CAME optimizer of PixArt-Sigma's configs (--optimizer came)
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-image"],
        "gpu": ["nvidia-ml-py"],
    },
)
