"""Tests of user COCO dataset registration, validation and mask-format inference."""

import itertools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.structures import BitMasks, polygons_to_bitmask
from PIL import Image

from wsbcn_d2.data import (
    generate_shapes_dataset,
    infer_mask_format,
    register_coco_dataset,
    validate_dataset_dicts,
)

_counter = itertools.count()


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    """A small generated dataset: (json path, image root, parsed json)."""
    out = tmp_path_factory.mktemp("coco")
    json_path = generate_shapes_dataset(str(out), num_images=12, seed=5)
    with open(json_path) as f:
        return json_path, os.path.join(str(out), "images"), json.load(f)


@pytest.fixture
def new_name():
    """Make unique dataset names; unregister them afterwards."""
    names = []

    def make() -> str:
        names.append(f"test_register_{next(_counter)}")
        return names[-1]

    yield make
    for name in names:
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)


def _write_json(tmp_path, coco: dict) -> str:
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    return str(path)


def test_register_and_load(coco_dataset, new_name):
    json_path, image_root, coco = coco_dataset
    name = new_name()
    register_coco_dataset(name, json_path, image_root)
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == len(coco["images"]) == 12
    assert sum(len(d["annotations"]) for d in dicts) == len(coco["annotations"])
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    meta = MetadataCatalog.get(name)
    assert meta.json_file == json_path
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == [c["name"] for c in coco["categories"]]


def test_register_twice(coco_dataset, new_name, tmp_path):
    json_path, image_root, coco = coco_dataset
    name = new_name()
    register_coco_dataset(name, json_path, image_root)
    register_coco_dataset(name, json_path, image_root)  # same files: no-op
    other = _write_json(tmp_path, coco)
    with pytest.raises(ValueError, match="already registered"):
        register_coco_dataset(name, other, image_root)


@pytest.mark.parametrize("missing_part", ["json_file", "image_root"])
def test_missing_path_is_named(coco_dataset, new_name, tmp_path, missing_part):
    json_path, image_root, _ = coco_dataset
    name = new_name()
    missing = str(tmp_path / "missing")
    paths = {"json_file": json_path, "image_root": image_root, missing_part: missing}
    with pytest.raises(FileNotFoundError, match=name) as err:
        register_coco_dataset(name, paths["json_file"], paths["image_root"])
    assert missing in str(err.value)
    assert name not in DatasetCatalog


def test_image_root_must_be_a_directory(coco_dataset, new_name):
    json_path, _, _ = coco_dataset
    with pytest.raises(ValueError, match="not a directory"):
        register_coco_dataset(new_name(), json_path, json_path)


def test_infer_mask_format(coco_dataset, new_name, tmp_path):
    json_path, image_root, coco = coco_dataset
    mixed = new_name()
    register_coco_dataset(mixed, json_path, image_root)
    polygon_only = new_name()
    anns = [a for a in coco["annotations"] if isinstance(a["segmentation"], list)]
    assert 0 < len(anns) < len(coco["annotations"])
    register_coco_dataset(
        polygon_only, _write_json(tmp_path, {**coco, "annotations": anns}), image_root
    )
    assert infer_mask_format([polygon_only]) == "polygon"
    assert infer_mask_format([mixed]) == "bitmask"
    assert infer_mask_format([polygon_only, mixed]) == "bitmask"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"segmentation": 5}, "segmentation must be a list of polygons or an RLE dict"),
        ({"segmentation": [[1, 2, 3, 4]]}, "at least 3 points"),
        ({"segmentation": {"size": [128, 128]}}, "needs 'size' and 'counts'"),
        ({"bbox": [120, 120, 30, 30]}, "outside the 128x128 image"),
        ({"bbox": []}, "bbox must be 4 finite numbers"),
    ],
    ids=["segm_int", "short_polygon", "rle_no_counts", "bbox_outside", "bbox_empty"],
)
def test_corrupt_annotation_is_reported(coco_dataset, new_name, tmp_path, change, message):
    json_path, image_root, coco = coco_dataset
    anns = [dict(a) for a in coco["annotations"]]
    bad = anns[3]
    bad.update(change)
    name = new_name()
    with pytest.raises(ValueError) as err:
        register_coco_dataset(name, _write_json(tmp_path, {**coco, "annotations": anns}), image_root)
    assert name not in DatasetCatalog
    text = str(err.value)
    assert message in text
    assert f"annotation id {bad['id']}" in text
    assert name in text
    file_name = next(i["file_name"] for i in coco["images"] if i["id"] == bad["image_id"])
    assert file_name in text


def test_validate_dataset_dicts_without_annotation_ids():
    record = {
        "file_name": "x.png",
        "image_id": 7,
        "height": 10,
        "width": 10,
        "annotations": [{"bbox": [0, 0, 5, 5], "bbox_mode": 1, "category_id": 0}],
    }
    validate_dataset_dicts("ds", [record])
    record["annotations"].append({"bbox": [0, 0, 5, 5], "bbox_mode": 1, "category_id": "cat"})
    with pytest.raises(ValueError, match=r"dataset ds: image 'x.png' \(id 7\), annotation #1"):
        validate_dataset_dicts("ds", [record])


def test_dataset_mapper_builds_bitmasks_from_mixed_segmentations(coco_dataset, new_name):
    json_path, image_root, _ = coco_dataset
    name = new_name()
    register_coco_dataset(name, json_path, image_root)
    mask_format = infer_mask_format([name])
    assert mask_format == "bitmask"
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="BGR",
        use_instance_mask=True,
        instance_mask_format=mask_format,
    )
    kinds = set()
    for record in DatasetCatalog.get(name)[:6]:
        h, w = record["height"], record["width"]
        expected = []
        for ann in record["annotations"]:
            segm = ann["segmentation"]
            kinds.add(type(segm))
            if isinstance(segm, dict):
                expected.append(mask_util.decode(segm).astype(bool))
            else:
                expected.append(polygons_to_bitmask(segm, h, w))
        instances = mapper(record)["instances"]
        assert isinstance(instances.gt_masks, BitMasks)
        assert torch.equal(instances.gt_masks.tensor, torch.from_numpy(np.stack(expected)))
        assert instances.gt_classes.tolist() == [a["category_id"] for a in record["annotations"]]
    assert kinds == {list, dict}


@pytest.mark.parametrize("segmentation", [[], None], ids=["empty_list", "no_key"])
def test_mask_training_needs_a_segmentation_on_every_annotation(coco_dataset, new_name, tmp_path, segmentation):
    json_path, image_root, coco = coco_dataset
    anns = [dict(a) for a in coco["annotations"]]
    bad = anns[0]  # the first of its image: detectron2 would build no gt_masks and fail at iteration 0
    if segmentation is None:
        del bad["segmentation"]
    else:
        bad["segmentation"] = segmentation
    crowd = {**anns[1], "id": 10**6, "iscrowd": 1, "segmentation": []}  # dropped in training: needs no mask
    name = new_name()
    register_coco_dataset(name, _write_json(tmp_path, {**coco, "annotations": [*anns, crowd]}), image_root)
    assert infer_mask_format([name]) == "bitmask"  # a box-only model may train on it
    with pytest.raises(ValueError, match=rf"dataset {name}: .*annotation id {bad['id']}: no segmentation.*MASK_ON"):
        infer_mask_format([name], require_masks=True)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_image_files_are_checked_at_registration(coco_dataset, new_name, tmp_path, damage):
    json_path, image_root, coco = coco_dataset
    images = tmp_path / "images"
    shutil.copytree(image_root, images)
    victim = images / coco["images"][7]["file_name"]
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(b"\x00not an image" * 8)
    name = new_name()
    with pytest.raises(FileNotFoundError if damage == "missing" else ValueError) as err:
        register_coco_dataset(name, json_path, str(images))
    assert str(victim) in str(err.value) and json_path in str(err.value)
    assert name not in DatasetCatalog


def test_image_check_reads_headers_only(coco_dataset, new_name, tmp_path):
    """200 listed 2048x2048 PNGs register in well under a second: pixels are not decoded."""
    _, _, coco = coco_dataset
    images = tmp_path / "images"
    images.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "0.png", compress_level=0)
    for i in range(1, 200):
        os.link(images / "0.png", images / f"{i}.png")
    listed = [{"id": i, "file_name": f"{i}.png", "height": 2048, "width": 2048} for i in range(200)]
    json_file = _write_json(tmp_path, {"images": listed, "annotations": [], "categories": coco["categories"]})
    start = time.perf_counter()
    register_coco_dataset(new_name(), json_file, str(images))
    assert time.perf_counter() - start < 1.0


def _without_image_ids(coco: dict) -> dict:
    return {**coco, "images": [{k: v for k, v in image.items() if k != "id"} for image in coco["images"]]}


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda text, coco: text[: len(text) // 2], "is not valid JSON (Expecting"),
        (lambda text, coco: json.dumps([coco]), "not a COCO instances file: expected 'images' and 'categories'"),
        (lambda text, coco: json.dumps({"info": {}}), "not a COCO instances file: expected 'images' and 'categories'"),
        (lambda text, coco: json.dumps({**coco, "images": []}), "'images' must be a non-empty list"),
        (lambda text, coco: json.dumps({**coco, "categories": []}), "'categories' must be a non-empty list"),
        (lambda text, coco: json.dumps(_without_image_ids(coco)), "images[0] has no 'id'"),
    ],
    ids=["truncated", "json_list", "not_coco", "no_images", "no_categories", "image_without_id"],
)
def test_broken_annotation_file_is_named(coco_dataset, new_name, tmp_path, content, message):
    json_path, image_root, coco = coco_dataset
    path = tmp_path / "broken.json"
    path.write_text(content(Path(json_path).read_text(), coco))
    name = new_name()
    with pytest.raises(ValueError) as err:
        register_coco_dataset(name, str(path), image_root)
    assert str(err.value).startswith(f"--register-coco {name}: {path}")
    assert message in str(err.value)
    assert name not in DatasetCatalog


def test_demo_split_names_are_refused_before_generation(coco_dataset, tmp_path, monkeypatch):
    json_path, image_root, _ = coco_dataset
    cache = tmp_path / "cache"
    monkeypatch.setenv("WSBCN_DATASETS", str(cache))
    with pytest.raises(ValueError, match="--register-coco wsbcn_shapes_train: this name belongs to the built-in demo"):
        register_coco_dataset("wsbcn_shapes_train", json_path, image_root)
    assert not cache.exists()  # nothing generated
