"""wsbcn_d2: Weight Standardization and Batch-Channel Normalization for detectron2.

Importing the package registers its backbones, heads and datasets.
"""
from . import modeling  # noqa: F401  (registers backbones and heads)
from .config import add_wsbcn_config

__all__ = ["add_wsbcn_config"]
