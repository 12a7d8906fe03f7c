import pytest

from wsbcn_d2.data import generate_shapes_dataset


@pytest.fixture(scope="session")
def dataset_opts(tmp_path_factory):
    """tools/train_net.py options training on 8 synthetic 64 px images registered as "tiny"."""
    root = tmp_path_factory.mktemp("tiny")
    json_file = generate_shapes_dataset(str(root), num_images=8, image_size=64, seed=3)
    return ["--register-coco", "tiny", json_file, str(root / "images"), "DATASETS.TRAIN", '("tiny",)']
