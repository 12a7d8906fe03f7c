"""Tests of the synthetic shapes dataset: determinism, COCO validity, registration."""

import importlib
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode, Boxes, Instances, polygons_to_bitmask
from pycocotools.coco import COCO

import wsbcn_d2.data
from wsbcn_d2.data import generate_shapes_dataset, register_shapes_datasets
from wsbcn_d2.data.shapes import CATEGORIES, SHAPES_SPLITS, _annotation


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    json_path = generate_shapes_dataset(str(out), num_images=60, seed=0)
    return json_path, COCO(json_path)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Point the shapes cache to an empty folder; restore the default registration after."""
    monkeypatch.setenv("WSBCN_DATASETS", str(tmp_path))
    yield tmp_path
    register_shapes_datasets()


def _images(directory: str) -> dict[str, np.ndarray]:
    image_dir = os.path.join(directory, "images")
    return {f: cv2.imread(os.path.join(image_dir, f)) for f in sorted(os.listdir(image_dir))}


def test_generation_is_deterministic(tmp_path):
    dirs = [str(tmp_path / d) for d in ("a", "b", "c")]
    paths = [
        generate_shapes_dataset(d, num_images=8, seed=seed) for d, seed in zip(dirs, (3, 3, 4))
    ]
    data = [open(p, "rb").read() for p in paths]
    assert data[0] == data[1]
    assert data[0] != data[2]
    images_a, images_b, images_c = (_images(d) for d in dirs)
    assert images_a.keys() == images_b.keys() == images_c.keys()
    assert all(np.array_equal(images_a[k], images_b[k]) for k in images_a)
    assert not all(np.array_equal(images_a[k], images_c[k]) for k in images_a)


def test_annotations_are_valid_coco(dataset):
    json_path, coco = dataset
    image_dir = os.path.join(os.path.dirname(json_path), "images")
    assert len(coco.getImgIds()) == 60
    category_ids = set(coco.getCatIds())
    assert [c["name"] for c in coco.loadCats(sorted(category_ids))] == list(CATEGORIES)
    assert {a["category_id"] for a in coco.dataset["annotations"]} == category_ids
    assert len({a["id"] for a in coco.dataset["annotations"]}) == len(coco.dataset["annotations"])
    for image_info in coco.loadImgs(coco.getImgIds()):
        image = cv2.imread(os.path.join(image_dir, image_info["file_name"]))
        assert image.shape == (image_info["height"], image_info["width"], 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
        assert 1 <= len(anns) <= 4
        for ann in anns:
            mask = coco.annToMask(ann)
            assert mask.shape == image.shape[:2]
            assert ann["iscrowd"] == 0
            assert ann["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            np.testing.assert_allclose(ann["bbox"], tight, atol=1)
            if isinstance(ann["segmentation"], list):
                assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
            else:
                assert ann["segmentation"]["size"] == [image_info["height"], image_info["width"]]
                assert isinstance(ann["segmentation"]["counts"], str)


def test_both_mask_formats_occur(dataset):
    _, coco = dataset
    kinds = {type(a["segmentation"]) for a in coco.dataset["annotations"]}
    assert kinds == {list, dict}


def test_visible_masks_are_disjoint_and_occlusions_occur(dataset):
    _, coco = dataset
    touching = 0
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() <= 1
        for i, a in enumerate(masks):
            grown = cv2.dilate(a, np.ones((3, 3), np.uint8))
            touching += sum(bool((grown & b).any()) for b in masks[i + 1 :])
    # Distinct objects only touch when one occludes the other.
    assert touching >= 5


def _occluded_circle(mask: np.ndarray) -> None:
    cv2.circle(mask, (30, 30), 17, 1, -1)
    cv2.circle(mask, (45, 45), 10, 0, -1)


@pytest.mark.parametrize(
    "draw",
    [
        lambda m: cv2.fillPoly(m, [np.array([[10, 12], [50, 20], [22, 55]], np.int32)], 1),
        lambda m: cv2.fillPoly(m, [np.array([[30, 5], [55, 30], [30, 55], [5, 30]], np.int32)], 1),
        _occluded_circle,
    ],
    ids=["triangle", "rotated_square", "occluded_circle"],
)
def test_polygons_rasterize_exactly(draw):
    mask = np.zeros((64, 64), np.uint8)
    draw(mask)
    ann = _annotation(mask)
    assert isinstance(ann["segmentation"], list)
    rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 64, 64))
    assert np.array_equal(mask_util.decode(rle), mask)


def test_ring_is_stored_as_rle():
    mask = np.zeros((64, 64), np.uint8)
    cv2.circle(mask, (32, 32), 20, 1, -1)
    cv2.circle(mask, (32, 32), 10, 0, -1)
    assert isinstance(_annotation(mask)["segmentation"], dict)


def test_registered_split_is_generated_lazily_in_cache(cache_dir):
    assert not os.listdir(cache_dir)
    dicts = DatasetCatalog.get("wsbcn_shapes_val")
    assert len(dicts) == SHAPES_SPLITS["wsbcn_shapes_val"]["num_images"]
    (split_dir,) = [d for d in os.listdir(cache_dir) if not d.startswith(".")]
    assert split_dir.startswith("wsbcn_shapes_val-v")
    assert not [d for d in os.listdir(cache_dir) if d.startswith(".")]  # no temp folder left
    for record in dicts:
        assert os.path.isfile(record["file_name"])
        assert record["height"] == record["width"] == 128
        for ann in record["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < len(CATEGORIES)
            assert isinstance(ann["segmentation"], (list, dict))
    meta = MetadataCatalog.get("wsbcn_shapes_val")
    assert meta.thing_classes == list(CATEGORIES)
    assert meta.json_file == os.path.join(cache_dir, split_dir, "annotations.json")
    assert meta.image_root == os.path.dirname(dicts[0]["file_name"])
    # A second call reuses the cache.
    mtime = os.path.getmtime(meta.json_file)
    assert len(DatasetCatalog.get("wsbcn_shapes_val")) == len(dicts)
    assert os.path.getmtime(meta.json_file) == mtime


def test_registration_is_idempotent(cache_dir):
    importlib.reload(wsbcn_d2.data)
    register_shapes_datasets(str(cache_dir / "explicit"))
    assert len(DatasetCatalog.get("wsbcn_shapes_val")) == 50
    assert os.path.isdir(cache_dir / "explicit")


def test_coco_evaluator_scores_ground_truth_perfectly(cache_dir, tmp_path):
    # Building the evaluator before any DatasetCatalog.get must generate the json.
    evaluator = COCOEvaluator("wsbcn_shapes_val", output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    for record in DatasetCatalog.get("wsbcn_shapes_val"):
        h, w = record["height"], record["width"]
        anns = record["annotations"]
        masks = [
            (
                mask_util.decode(a["segmentation"]).astype(bool)
                if isinstance(a["segmentation"], dict)
                else polygons_to_bitmask(a["segmentation"], h, w)
            )
            for a in anns
        ]
        instances = Instances((h, w))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(anns))
        instances.pred_classes = torch.tensor([a["category_id"] for a in anns])
        instances.pred_masks = torch.from_numpy(np.stack(masks))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] > 99
    assert results["segm"]["AP"] > 99
