from setuptools import find_packages, setup

setup(
    name="wsbcn_d2",
    version="0.1.0",
    description="Weight Standardization and Batch-Channel Normalization for detectron2",
    packages=find_packages(include=["wsbcn_d2", "wsbcn_d2.*"]),
    python_requires=">=3.10",
    # detectron2 is not on PyPI under its own name: tools/setup_env.sh installs it.
    install_requires=["torch>=2.0", "torchvision", "fvcore", "pycocotools"],
)
