"""wsbcn_d2: Weight Standardization and Batch-Channel Normalization for detectron2.

Importing the package registers its backbones, heads and demo datasets.
"""
from . import data, modeling  # noqa: F401  (registration happens at import)
from .config import add_wsbcn_config
from .modeling import fold_for_inference

__all__ = ["add_wsbcn_config", "fold_for_inference"]
