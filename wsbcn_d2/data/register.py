"""Registration and sanity checks of user datasets in COCO instance format."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

__all__ = ["register_coco_dataset", "infer_mask_format", "validate_dataset_dicts"]

# Boxes may stick out of the image by this many pixels (rounding in annotation tools).
_BBOX_TOLERANCE = 1.0


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO instance-segmentation dataset under ``name``.

    Equivalent to detectron2's ``register_coco_instances``, except that the loader
    first checks every annotation (see :func:`validate_dataset_dicts`) and keeps the
    annotation ids, so that a corrupt file fails with an error naming the culprit.
    Registering the same name again with the same files is a no-op.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist.
        ValueError: ``json_file`` is not a file, ``image_root`` not a directory, or
            ``name`` is already registered with different files.
    """
    json_file = os.path.abspath(json_file)
    image_root = os.path.abspath(image_root)
    if not os.path.exists(json_file):
        raise FileNotFoundError(f"--register-coco {name}: annotation file not found: {json_file}")
    if not os.path.isfile(json_file):
        raise ValueError(f"--register-coco {name}: annotation path is not a file: {json_file}")
    if not os.path.exists(image_root):
        raise FileNotFoundError(f"--register-coco {name}: image directory not found: {image_root}")
    if not os.path.isdir(image_root):
        raise ValueError(f"--register-coco {name}: image root is not a directory: {image_root}")
    if name in DatasetCatalog:
        meta = MetadataCatalog.get(name)
        registered = (meta.get("json_file"), meta.get("image_root"))
        if registered == (json_file, image_root):
            return
        raise ValueError(
            f"--register-coco {name}: a dataset of this name is already registered with "
            f"json_file={registered[0]}, image_root={registered[1]}"
        )
    DatasetCatalog.register(name, lambda: _load_checked_coco_json(name, json_file, image_root))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _load_checked_coco_json(name: str, json_file: str, image_root: str) -> list[dict]:
    """Validate the raw COCO annotations, then load them with detectron2."""
    with open(json_file) as f:
        coco = json.load(f)
    validate_dataset_dicts(name, _raw_records(name, coco))
    return load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])


def _raw_records(name: str, coco: dict) -> list[dict]:
    """Group the raw annotations of a COCO dict per image, in dataset-dict layout."""
    if not isinstance(coco, dict) or "images" not in coco:
        raise ValueError(f"dataset {name}: not a COCO instances file (no 'images' list)")
    records = {
        image["id"]: {**image, "image_id": image["id"], "annotations": []}
        for image in coco["images"]
    }
    for ann in coco.get("annotations", []):
        if ann.get("image_id") not in records:
            raise ValueError(
                f"dataset {name}: annotation id {ann.get('id')} refers to unknown "
                f"image_id {ann.get('image_id')!r}"
            )
        records[ann["image_id"]]["annotations"].append({**ann, "bbox_mode": BoxMode.XYWH_ABS})
    return list(records.values())


def _as_numbers(value: object) -> np.ndarray | None:
    """``value`` as a 1-D float array if it is a flat sequence of finite numbers."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if array.ndim != 1 or not np.isfinite(array).all():
        return None
    return array


def _annotation_problem(ann: dict, height: int | None, width: int | None) -> str | None:
    """Describe what is wrong with one dataset-dict annotation, or return None."""
    bbox = _as_numbers(ann.get("bbox"))
    if bbox is None or len(bbox) != 4:
        return f"bbox must be 4 finite numbers, got {ann.get('bbox')!r}"
    if "bbox_mode" not in ann:
        return "missing bbox_mode"
    x0, y0, x1, y1 = BoxMode.convert(bbox.tolist(), ann["bbox_mode"], BoxMode.XYXY_ABS)
    if x1 < x0 or y1 < y0:
        return f"bbox has negative size: {ann['bbox']}"
    if height is not None and width is not None:
        tol = _BBOX_TOLERANCE
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            return f"bbox {ann['bbox']} lies outside the {width}x{height} image"
    if not isinstance(ann.get("category_id"), numbers.Integral):
        return f"category_id must be an integer, got {ann.get('category_id')!r}"

    segm = ann.get("segmentation")
    if segm is None:
        return None
    if isinstance(segm, list):
        for poly in segm:
            coords = _as_numbers(poly)
            if coords is None:
                return f"polygon must be a list of finite numbers, got {poly!r}"
            if len(coords) % 2 or len(coords) < 6:
                return (
                    f"polygon needs at least 3 points (an even number of >= 6 coordinates), "
                    f"got {len(coords)} coordinates"
                )
        return None
    if isinstance(segm, dict):
        if not {"size", "counts"} <= segm.keys():
            return f"RLE segmentation needs 'size' and 'counts', got keys {sorted(segm)}"
        if not isinstance(segm["counts"], (str, bytes, list)):
            return f"RLE counts must be a string or a list, got {type(segm['counts']).__name__}"
        size = _as_numbers(segm["size"])
        if size is None or len(size) != 2:
            return f"RLE size must be [height, width], got {segm['size']!r}"
        if height is not None and width is not None and size.tolist() != [height, width]:
            return f"RLE size {segm['size']!r} differs from the image size [{height}, {width}]"
        return None
    return f"segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}"


def validate_dataset_dicts(name: str, dicts: Iterable[dict]) -> None:
    """Check the annotations of dataset dicts (detectron2 layout).

    Checks boxes (4 finite numbers, inside the image up to 1 px), category ids and
    segmentations (polygons with >= 3 points, or RLE dicts of the image's size).

    Raises:
        ValueError: naming the dataset, the image and the annotation id (or index).
    """
    for record in dicts:
        height, width = record.get("height"), record.get("width")
        for index, ann in enumerate(record.get("annotations", [])):
            problem = _annotation_problem(ann, height, width)
            if problem is not None:
                ann_ref = f"annotation id {ann['id']}" if "id" in ann else f"annotation #{index}"
                raise ValueError(
                    f"dataset {name}: image {record.get('file_name')!r} "
                    f"(id {record.get('image_id')}), {ann_ref}: {problem}"
                )


def infer_mask_format(dataset_names: Iterable[str]) -> str:
    """Return the ``INPUT.MASK_FORMAT`` the datasets need.

    "bitmask" if any annotation has an RLE (dict) segmentation, "polygon" otherwise.
    The datasets are loaded from the DatasetCatalog and validated on the way.
    """
    mask_format = "polygon"
    for name in dataset_names:
        dicts = DatasetCatalog.get(name)
        validate_dataset_dicts(name, dicts)
        if any(
            isinstance(ann.get("segmentation"), dict)
            for record in dicts
            for ann in record.get("annotations", [])
        ):
            mask_format = "bitmask"
    return mask_format
