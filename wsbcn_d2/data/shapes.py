"""Deterministic synthetic instance-segmentation dataset ("shapes") in COCO format.

Each image shows 1-4 objects (circle, square, triangle, ring) of varied size and
colour on a noisy, textured background. Later objects occlude earlier ones and every
annotation describes the *visible* part of its object. Masks are stored as polygons
when the visible part is a single region without holes, and as COCO RLE otherwise.
Polygons follow the pixel edges, so they rasterize exactly to the visible mask.

The splits ``wsbcn_shapes_train`` and ``wsbcn_shapes_val`` are registered in
detectron2's catalogs and generated on first use into a cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json

__all__ = [
    "CATEGORIES",
    "SHAPES_SPLITS",
    "generate_shapes_dataset",
    "ensure_shapes_dataset",
    "register_shapes_datasets",
]

# Bump whenever the generator's output changes, so that cached datasets are regenerated.
GENERATOR_VERSION = 1
CATEGORIES = ("circle", "square", "triangle", "ring")
SHAPES_SPLITS = {
    "wsbcn_shapes_train": {"num_images": 400, "image_size": 128, "seed": 0},
    "wsbcn_shapes_val": {"num_images": 50, "image_size": 128, "seed": 1},
}

_MIN_SIZE, _MAX_SIZE = 0.15, 0.55  # object size as a fraction of the image side
_MIN_VISIBLE_FRACTION = 0.3  # drop objects occluded more than this
_MIN_VISIBLE_PIXELS = 20
_MIN_COLOUR_DISTANCE = 100.0  # Euclidean distance in BGR space to the local background

_cache_root_override: str | None = None


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency random colour field plus a sinusoidal texture, as float32 HxWx3."""
    grid = rng.integers(2, 5)
    coarse = rng.uniform(0, 255, size=(grid, grid, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
    amplitude = rng.uniform(0, 30)
    image += (amplitude * np.sin(phase))[..., None]
    return image


def _shape_mask(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """Full (unoccluded) uint8 mask of one randomly sized, placed and rotated shape."""
    mask = np.zeros((size, size), np.uint8)
    extent = rng.uniform(_MIN_SIZE, _MAX_SIZE) * size  # diameter / side length
    radius = extent / 2
    cx, cy = rng.uniform(radius, size - radius, size=2)
    center = (int(round(cx)), int(round(cy)))
    if category in ("circle", "ring"):
        cv2.circle(mask, center, int(round(radius)), 1, thickness=-1)
        if category == "ring":
            inner = radius * rng.uniform(0.4, 0.65)
            cv2.circle(mask, center, int(round(inner)), 0, thickness=-1)
        return mask
    angle = rng.uniform(0, 2 * np.pi)
    if category == "square":
        # A rotated square of side ``extent`` has circumradius extent / sqrt(2).
        angles = angle + np.arange(4) * np.pi / 2
        circumradius = extent / np.sqrt(2)
    else:  # triangle: irregular, with vertices jittered around an equilateral one
        angles = angle + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, size=3)
        circumradius = radius
    points = np.stack(
        [cx + circumradius * np.cos(angles), cy + circumradius * np.sin(angles)], axis=1
    )
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def _pick_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    """A random colour far from ``local_mean`` (the best of a few draws otherwise)."""
    candidates = rng.uniform(0, 255, size=(16, 3))
    distances = np.linalg.norm(candidates - local_mean, axis=1)
    far = np.flatnonzero(distances >= _MIN_COLOUR_DISTANCE)
    return candidates[far[0] if far.size else int(np.argmax(distances))]


def _edge_polygon(mask: np.ndarray) -> list[int] | None:
    """Polygon along the pixel edges of ``mask`` if it is one region without holes.

    The mask is upsampled 2x so that contour vertices fall on half pixels, which map
    back to pixel corners with ``ceil(p / 2)``. Returns None when the mask is not a
    single hole-free region or the polygon does not rasterize back exactly.
    """
    height, width = mask.shape
    upsampled = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) != 1:  # several pieces, or a hole
        return None
    points = (contours[0].reshape(-1, 2) + 1) // 2
    points = points[np.any(points != np.roll(points, 1, axis=0), axis=1)]
    if len(points) < 3:
        return None
    polygon = points.ravel().tolist()
    rle = mask_util.merge(mask_util.frPyObjects([polygon], height, width))
    if not np.array_equal(mask_util.decode(rle), mask):
        return None
    return polygon


def _annotation(mask: np.ndarray) -> dict:
    """COCO segmentation, area and tight bbox of a non-empty visible mask."""
    polygon = _edge_polygon(mask)
    if polygon is not None:
        segmentation: list | dict = [polygon]
    else:
        rle = mask_util.encode(np.asfortranarray(mask))
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
    return {"segmentation": segmentation, "area": int(len(xs)), "bbox": bbox}


def _render_image(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One BGR uint8 image and its (category index, visible mask) pairs, bottom to top."""
    image = _background(rng, size)
    objects = []
    for _ in range(rng.integers(1, 5)):
        category = int(rng.integers(len(CATEGORIES)))
        objects.append((category, _shape_mask(rng, CATEGORIES[category], size)))

    # Decide top-down which objects stay visible enough; dropped objects are not drawn.
    covered = np.zeros((size, size), bool)
    kept = []
    for category, mask in reversed(objects):
        full = mask.astype(bool)
        visible = full & ~covered
        area = int(visible.sum())
        if area >= _MIN_VISIBLE_PIXELS and area >= _MIN_VISIBLE_FRACTION * full.sum():
            kept.append((category, full, visible))
            covered |= full
    kept.reverse()

    for _, full, _ in kept:
        image[full] = _pick_colour(rng, image[full].mean(axis=0))
    image += rng.normal(0, rng.uniform(3, 10), size=image.shape).astype(np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, [(category, visible.astype(np.uint8)) for category, _, visible in kept]


def generate_shapes_dataset(
    output_dir: str, *, num_images: int, image_size: int = 128, seed: int = 0
) -> str:
    """Write a synthetic COCO instance-segmentation dataset into ``output_dir``.

    Images go to ``output_dir/images/*.png``, annotations to
    ``output_dir/annotations.json``. The output depends only on the arguments:
    the same seed gives a byte-identical JSON file and identical image pixels.

    Returns:
        The path of the annotation file.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, objects = _render_image(rng, image_size)
        file_name = f"{image_id:06d}.png"
        if not cv2.imwrite(os.path.join(image_dir, file_name), image):
            raise OSError(f"could not write image {os.path.join(image_dir, file_name)}")
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        for category, visible in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    **_annotation(visible),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": "wsbcn_d2 synthetic shapes",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)],
    }
    json_path = os.path.join(output_dir, "annotations.json")
    with open(json_path, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    return json_path


def _cache_root() -> str:
    """Root of the dataset cache, resolved at call time."""
    if _cache_root_override is not None:
        return _cache_root_override
    return os.environ.get("WSBCN_DATASETS") or os.path.join(
        os.path.expanduser("~"), ".cache", "wsbcn_d2", "datasets"
    )


def _split_dir(name: str) -> str:
    params = SHAPES_SPLITS[name]
    folder = (
        f"{name}-v{GENERATOR_VERSION}-n{params['num_images']}"
        f"-s{params['image_size']}-seed{params['seed']}"
    )
    return os.path.join(_cache_root(), folder)


def ensure_shapes_dataset(name: str) -> str:
    """Generate the split ``name`` into the cache if missing; return its directory.

    The split is generated into a temporary sibling folder and renamed into place, so
    an interrupted run never leaves a partial dataset behind under the final name.
    """
    final_dir = _split_dir(name)
    if os.path.isfile(os.path.join(final_dir, "annotations.json")):
        return final_dir
    if os.path.isdir(final_dir):  # damaged by hand: start over
        shutil.rmtree(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp-", dir=parent)
    try:
        generate_shapes_dataset(tmp_dir, **SHAPES_SPLITS[name])
        os.rename(tmp_dir, final_dir)
    except OSError:
        # Another process may have finished the same (deterministic) split first.
        if not os.path.isfile(os.path.join(final_dir, "annotations.json")):
            raise
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
    return final_dir


class _ShapesMetadata(Metadata):
    """Metadata whose file paths follow the cache root and trigger generation."""

    @property
    def json_file(self) -> str:
        return os.path.join(ensure_shapes_dataset(self.name), "annotations.json")

    @property
    def image_root(self) -> str:
        return os.path.join(_split_dir(self.name), "images")


def _load_split(name: str) -> list[dict]:
    split_dir = ensure_shapes_dataset(name)
    return load_coco_json(
        os.path.join(split_dir, "annotations.json"), os.path.join(split_dir, "images"), name
    )


def register_shapes_datasets(root: str | None = None) -> None:
    """Register ``wsbcn_shapes_train`` and ``wsbcn_shapes_val`` (re-registering is fine).

    Args:
        root: cache directory. If None, ``$WSBCN_DATASETS`` (read when the data is
            used, not now) or ``~/.cache/wsbcn_d2/datasets``.
    """
    global _cache_root_override
    _cache_root_override = root
    for name in SHAPES_SPLITS:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda name=name: _load_split(name))
        MetadataCatalog[name] = _ShapesMetadata(name=name).set(
            thing_classes=list(CATEGORIES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CATEGORIES))},
            evaluator_type="coco",
        )
