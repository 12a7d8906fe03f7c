"""Checkpoints: converting ImageNet-pretrained WS / BCN backbones, and the tools' checkpointer."""

from .checkpointer import WSBCNCheckpointer, check_weights
from .convert import (
    INPUT_FORMAT,
    LAYOUTS,
    NORM_FAMILIES,
    PIXEL_MEAN,
    PIXEL_STD,
    ConversionError,
    ConversionResult,
    Layout,
    check_destination,
    convert_checkpoint,
    load_source,
    save_checkpoint,
)
from .io import AtomicWritePathManager, CheckpointError, atomic_write, read_failure

__all__ = [k for k in globals().keys() if not k.startswith("_")]
