from pathlib import Path

from setuptools import setup

setup(
    name="sd",
    version="0.1.0",
    description="Stable Diffusion v1.x from scratch in plain PyTorch",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # the built-in model and the tokenizer's vocabulary live in the top-level weights/ and data/ folders; installed,
    # they are sd/weights/ and sd/data/, where sd/package_data.py looks first
    packages=["sd", "sd.train", "sd.weights", "sd.data"],
    package_dir={"sd.weights": "weights", "sd.data": "data"},
    package_data={"sd.weights": ["*.safetensors"], "sd.data": ["*.txt.gz", "*.LICENSE", "README.md"]},
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
            "peft==0.21.2",  # diffusers' load_lora_weights needs it
            "tomesd==0.1.3",  # token merging's reference
            "DeepCache==0.1.1",  # DeepCache's reference (its DeepCacheSDHelper)
        ],
    },
)
