"""Registration and sanity checks of user datasets in COCO instance format."""

from __future__ import annotations

import argparse
import difflib
import json
import numbers
import os
from collections.abc import Iterable, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

from .shapes import SHAPES_SPLITS

__all__ = [
    "add_register_coco_argument",
    "check_dataset_names",
    "infer_mask_format",
    "register_coco_dataset",
    "validate_dataset_dicts",
]

# Boxes may stick out of the image by this many pixels (rounding in annotation tools).
_BBOX_TOLERANCE = 1.0
# What detectron2's load_coco_json reads from each image and category.
_IMAGE_KEYS = {"id", "file_name", "height", "width"}
_CATEGORY_KEYS = {"id", "name"}


def add_register_coco_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--register-coco NAME JSON_FILE IMAGE_ROOT`` (repeatable) to a tool's ``parser``; the tool registers
    ``args.register_coco`` with :func:`register_coco_dataset` before it reads its config."""
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-format instance dataset under NAME (repeatable; before the KEY VALUE options)",
    )


def check_dataset_names(names: Sequence[str], key: str) -> None:
    """Raise a one-line ValueError naming ``key`` (e.g. DATASETS.TRAIN) for a dataset name nobody registered."""
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(
                f"{key}: no dataset {name!r} is registered; {hint}register your own with "
                f"--register-coco {name} JSON_FILE IMAGE_ROOT"
            )


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO instance-segmentation dataset under ``name``, checking it at once.

    Equivalent to detectron2's ``register_coco_instances``, except that it first checks
    the annotation file (COCO JSON with non-empty ``images`` and ``categories``, every
    image with id, file_name, height and width), every annotation (see
    :func:`validate_dataset_dicts`) and every image file (it exists and PIL reads its
    header; pixels are not decoded), and that the loader keeps the annotation ids:
    a broken dataset fails here, naming the file, image or annotation, not mid-training.
    Registering the same name again with the same files is a no-op.

    Raises:
        FileNotFoundError: ``json_file``, ``image_root`` or an image file does not exist.
        ValueError: a name of the built-in demo splits or already registered with other
            files, ``json_file`` not a COCO instances file, a corrupt annotation or image.
    """
    flag = f"--register-coco {name}"
    if name in SHAPES_SPLITS:  # before touching its metadata, which would generate the split
        raise ValueError(f"{flag}: this name belongs to the built-in demo dataset; register yours under another name")
    json_file = os.path.abspath(json_file)
    image_root = os.path.abspath(image_root)
    if not os.path.exists(json_file):
        raise FileNotFoundError(f"{flag}: annotation file not found: {json_file}")
    if not os.path.isfile(json_file):
        raise ValueError(f"{flag}: annotation path is not a file: {json_file}")
    if not os.path.exists(image_root):
        raise FileNotFoundError(f"{flag}: image directory not found: {image_root}")
    if not os.path.isdir(image_root):
        raise ValueError(f"{flag}: image root is not a directory: {image_root}")
    if name in DatasetCatalog:
        meta = MetadataCatalog.get(name)
        registered = (meta.get("json_file"), meta.get("image_root"))
        if registered == (json_file, image_root):
            return
        raise ValueError(
            f"{flag}: a dataset of this name is already registered with "
            f"json_file={registered[0]}, image_root={registered[1]}"
        )
    coco = _read_coco_json(flag, json_file)
    validate_dataset_dicts(name, _raw_records(name, coco))
    _check_image_files(flag, json_file, image_root, coco["images"])
    DatasetCatalog.register(
        name, lambda: load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _read_coco_json(flag: str, json_file: str) -> dict:
    """Parse ``json_file`` and check the COCO fields that detectron2's loader relies on."""
    try:
        with open(json_file, encoding="utf-8") as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{flag}: {json_file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "is it truncated?"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {json_file} is not a JSON text file (not UTF-8)") from None
    problem = _coco_problem(coco)
    if problem:
        raise ValueError(f"{flag}: {json_file}: {problem}")
    return coco


def _coco_problem(coco: object) -> str | None:
    """What keeps parsed JSON from being a COCO instances file detectron2 can load, or None."""
    if not isinstance(coco, dict) or not {"images", "categories"} <= coco.keys():
        found = f"keys {sorted(coco)}" if isinstance(coco, dict) else f"a JSON {type(coco).__name__}"
        return f"not a COCO instances file: expected 'images' and 'categories' lists, found {found}"
    for key, required in (("images", _IMAGE_KEYS), ("categories", _CATEGORY_KEYS)):
        entries = coco[key]
        if not isinstance(entries, list) or not entries:
            return f"'{key}' must be a non-empty list, got {entries!r:.40}"
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not required <= entry.keys():
                absent = sorted(required - entry.keys()) if isinstance(entry, dict) else sorted(required)
                return f"{key}[{i}] has no {' or '.join(map(repr, absent))}"
    if not isinstance(coco.get("annotations", []), list):
        return "'annotations' must be a list"
    return None


def _check_image_files(flag: str, json_file: str, image_root: str, images: list[dict]) -> None:
    """Check that every image file exists and that PIL identifies it from its header."""
    for image in images:
        path = os.path.join(image_root, image["file_name"])
        where = f"(image id {image['id']} of {json_file})"
        try:
            with Image.open(path):  # reads the header only
                pass
        except FileNotFoundError:
            raise FileNotFoundError(f"{flag}: image file not found: {path} {where}") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{flag}: cannot read image {path} {where}: {e}") from None


def _raw_records(name: str, coco: dict) -> list[dict]:
    """Group the raw annotations of a COCO dict per image, in dataset-dict layout."""
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


def _annotation_problem(ann: dict, height: int | None, width: int | None, require_mask: bool) -> str | None:
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
    if segm is None or segm == []:
        if require_mask and not ann.get("iscrowd"):  # detectron2 drops crowd annotations in training
            return (
                "no segmentation, but mask training (MODEL.MASK_ON) needs one on every annotation: "
                "add it, remove the annotation, or set MODEL.MASK_ON False"
            )
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


def validate_dataset_dicts(name: str, dicts: Iterable[dict], require_masks: bool = False) -> None:
    """Check the annotations of dataset dicts (detectron2 layout).

    Checks boxes (4 finite numbers, inside the image up to 1 px), category ids and
    segmentations (polygons with >= 3 points, or RLE dicts of the image's size); with
    ``require_masks``, that every non-crowd annotation has a segmentation.

    Raises:
        ValueError: naming the dataset, the image and the annotation id (or index).
    """
    for record in dicts:
        height, width = record.get("height"), record.get("width")
        for index, ann in enumerate(record.get("annotations", [])):
            problem = _annotation_problem(ann, height, width, require_masks)
            if problem is not None:
                ann_ref = f"annotation id {ann['id']}" if "id" in ann else f"annotation #{index}"
                raise ValueError(
                    f"dataset {name}: image {record.get('file_name')!r} "
                    f"(id {record.get('image_id')}), {ann_ref}: {problem}"
                )


def infer_mask_format(dataset_names: Iterable[str], require_masks: bool = False) -> str:
    """Return the ``INPUT.MASK_FORMAT`` the datasets need.

    "bitmask" if any annotation has an RLE (dict) segmentation, "polygon" otherwise.
    The datasets are loaded from the DatasetCatalog and validated on the way (see
    :func:`validate_dataset_dicts`; ``require_masks`` for a mask-training set).
    """
    mask_format = "polygon"
    for name in dataset_names:
        dicts = DatasetCatalog.get(name)
        validate_dataset_dicts(name, dicts, require_masks)
        if any(
            isinstance(ann.get("segmentation"), dict)
            for record in dicts
            for ann in record.get("annotations", [])
        ):
            mask_format = "bitmask"
    return mask_format
