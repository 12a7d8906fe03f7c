"""Datasets: the built-in synthetic shapes splits and user COCO datasets.

Importing this package registers ``wsbcn_shapes_train`` and ``wsbcn_shapes_val``.
"""

from .register import (
    add_register_coco_argument,
    check_dataset_names,
    infer_mask_format,
    register_coco_dataset,
    validate_dataset_dicts,
)
from .shapes import ensure_shapes_dataset, generate_shapes_dataset, register_shapes_datasets

__all__ = [
    "add_register_coco_argument",
    "check_dataset_names",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "infer_mask_format",
    "register_coco_dataset",
    "register_shapes_datasets",
    "validate_dataset_dicts",
]

register_shapes_datasets()
