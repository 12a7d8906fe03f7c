"""Loading ImageNet-pretrained WS / BCN backbones: conversion into detectron2 checkpoints."""

from .convert import (
    INPUT_FORMAT,
    LAYOUTS,
    NORM_FAMILIES,
    PIXEL_MEAN,
    PIXEL_STD,
    ConversionError,
    ConversionResult,
    Layout,
    WSBCNCheckpointer,
    convert_checkpoint,
    load_source,
    save_checkpoint,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
