from pathlib import Path

from setuptools import setup

setup(
    name="sd",
    version="0.1.0",
    description="Stable Diffusion v1.x from scratch in plain PyTorch",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=["sd"],
    python_requires=">=3.10",
    install_requires=["torch>=2.1,<3", "numpy", "pillow", "tqdm", "safetensors"],
    extras_require={
        # the reference implementations we are tested against: never imported by sd/ itself
        "test": [
            "pytest>=8",
            "diffusers==0.42.1",
            "transformers==5.23.0",
            "accelerate==1.15.0",
            "ftfy==6.3.1",
            "scipy==1.17.1",  # diffusers' LMS scheduler integrates with it
        ],
    },
)
