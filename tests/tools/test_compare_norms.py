"""tools/compare_norms.py: schedule rescaling, run reuse, and a 2-iteration end-to-end comparison."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from helpers import CONFIG_DIR, REPO, load_config

CONFIG = os.path.join(CONFIG_DIR, "Demo", "mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml")


@pytest.fixture(scope="module")
def compare_norms():
    sys.path.insert(0, os.path.join(REPO, "tools"))  # as when run as a script: it imports benchmark
    try:
        yield importlib.import_module("compare_norms")
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))


def as_dict(opts):
    return dict(zip(opts[::2], opts[1::2]))


def test_schedule_rescaled_to_one_image_per_batch(compare_norms):
    cfg = load_config("Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml")
    solver = cfg.SOLVER
    iters = solver.MAX_ITER * solver.IMS_PER_BATCH  # as many images as the config sees
    opts = as_dict(compare_norms.schedule_opts(cfg, iters))

    assert opts["SOLVER.IMS_PER_BATCH"] == "1" and opts["SOLVER.MAX_ITER"] == str(iters)
    assert float(opts["SOLVER.BASE_LR"]) == pytest.approx(solver.BASE_LR / solver.IMS_PER_BATCH)
    assert eval(opts["SOLVER.STEPS"]) == tuple(s * solver.IMS_PER_BATCH for s in solver.STEPS)
    assert int(opts["SOLVER.WARMUP_ITERS"]) == solver.WARMUP_ITERS * solver.IMS_PER_BATCH
    # a very short run keeps its steps strictly inside (0, iters)
    steps = eval(as_dict(compare_norms.schedule_opts(cfg, 3))["SOLVER.STEPS"])
    assert all(0 < s < 3 for s in steps)


def test_finished_run_reused_only_with_the_same_config(compare_norms, tmp_path):
    opts = ["MODEL.BCN.UPDATE_RATE", "0.1"]
    config = compare_norms.resolved_config(CONFIG, opts)
    (tmp_path / "requested_config.yaml").write_text(config)
    records = [{"iteration": 19, "total_loss": 2.0}, {"iteration": 39, "total_loss": 1.5}]
    records.append({"iteration": 40, "bbox/AP": 30.0, "bbox/AP50": 50.0, "segm/AP": 28.0, "segm/AP50": 45.0})
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records))

    metrics = compare_norms.read_metrics(str(tmp_path), config)
    assert metrics["loss"] == [(19, 2.0), (39, 1.5)] and metrics["ap"]["segm/AP"] == 28.0
    changed = compare_norms.resolved_config(CONFIG, ["MODEL.BCN.UPDATE_RATE", "0.3"])
    assert compare_norms.read_metrics(str(tmp_path), changed) is None


def test_ordering_verdict_states_margins(compare_norms):
    def runs(*per_seed):  # per_seed: {setting: (box AP, mask AP)}
        def metrics(box, mask):
            return {"ap": {"bbox/AP": box, "bbox/AP50": 0.0, "segm/AP": mask, "segm/AP50": 0.0}, "loss": [(1, 1.0)]}

        return {s: [metrics(*seed[s]) for seed in per_seed] for s in per_seed[0]}

    one = runs({"GN": (40.0, 41.0), "GN+WS": (42.5, 40.0), "BCN+WS": (45.0, 44.0)})
    box, mask = compare_norms.ordering_verdict(one).splitlines()
    assert "bbox/AP" in box and " holds" in box and "+2.5" in box and "seeds" not in box
    assert "segm/AP" in mask and "does not hold" in mask and "-1.0" in mask and "+4.0" in mask

    two = runs(
        {"GN": (40.0, 41.0), "GN+WS": (42.0, 40.0), "BCN+WS": (45.0, 44.0)},
        {"GN": (42.0, 41.0), "GN+WS": (41.0, 44.0), "BCN+WS": (44.0, 43.0)},
    )
    box, mask = compare_norms.ordering_verdict(two).splitlines()
    # means: box 41 / 41.5 / 44.5, mask 41 / 42 / 43.5
    assert " holds" in box and "+0.5" in box and "+3.0" in box and "holds in 1 of 2 seeds" in box
    assert " holds" in mask and "+1.0" in mask and "+1.5" in mask and "holds in 0 of 2 seeds" in mask
    assert "| GN+WS | 41.5 (42.0 / 41.0) | 0.0 (0.0 / 0.0) | 42.0 (40.0 / 44.0) |" in compare_norms.ap_table(two, "norms")


def test_two_iteration_comparison_writes_docs_and_reuses_runs(tmp_path):
    env = {**os.environ, "WSBCN_DATASETS": str(tmp_path / "datasets")}
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare_norms.py"), "--iters", "2"]
    cmd += ["--work-dir", str(tmp_path / "runs"), "--docs-dir", str(tmp_path / "docs"), "--reuse"]
    cmd += ["TEST.DETECTIONS_PER_IMAGE", "5"]
    first = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    table = (tmp_path / "docs" / "norm_comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| GN") or line.startswith("| BCN")]
    assert [row.split("|")[1].strip() for row in rows] == ["GN", "GN+WS", "BCN+WS"]
    assert (tmp_path / "docs" / "norm_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run_dir in ("GN", "GN_WS", "BCN_WS_r0.1"):
        assert (tmp_path / "runs" / "2it_seed0" / run_dir / "model_final.pth").is_file()

    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3 and (tmp_path / "docs" / "norm_comparison.md").read_text() == table
