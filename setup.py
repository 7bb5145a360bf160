"""stellar_hf: STELLAR sparse semantic tokens x spatial maps, as Hugging Face transformers models."""

from pathlib import Path

from setuptools import find_packages, setup

BASE = [
    # A range, never a pin: a newer torch than the one already installed would download gigabytes.
    "torch>=2.4",
    "transformers>=5.24,<6",
    "safetensors>=0.4",
    "huggingface-hub>=1.0",
    "numpy>=1.24",
    "pillow>=10.0",
]
TRAIN = ["accelerate>=1.0", "datasets>=3.0", "torchvision>=0.19", "timm>=1.0", "tensorboard>=2.14", "tqdm>=4.66"]
# torch-fidelity: the FID Inception-V3 network of rFID (stellar_hf.evaluation.load_inception); its weights are read
# from disk, never downloaded at run time.
EVAL = ["lpips>=0.1.4", "torch-fidelity>=0.3", "evaluate>=0.4", "scikit-learn>=1.3", "torchvision>=0.19", "scipy>=1.10"]
# The explorer (examples/explorer.py): a Gradio page; torchvision for the built-in synthetic samples.
DEMO = ["gradio>=6.0,<7", "torchvision>=0.19"]
# selenium drives the explorer's browser test (tests/test_explorer_browser.py) through the system's chromedriver.
DEV = sorted(set(TRAIN + EVAL + DEMO + ["pytest>=8.0", "scikit-image>=0.22", "selenium>=4.20"]))

setup(
    name="stellar_hf",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["stellar_hf", "stellar_hf.*"]),
    # view_kernels.c: built on first use on the machine that runs it (stellar_hf.native).
    package_data={"stellar_hf": ["MODEL_CARD.md", "view_kernels.c"]},
    install_requires=BASE,
    extras_require={"train": TRAIN, "eval": EVAL, "demo": DEMO, "dev": DEV},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
