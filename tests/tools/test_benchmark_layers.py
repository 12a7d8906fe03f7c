"""tools/benchmark_layers.py on a small input, on CPU (no timing thresholds)."""
from helpers import load_tool


def test_layer_benchmark_times_both_layers_and_rates_them_against_gn():
    tool = load_tool("benchmark_layers")
    results = tool.measure((2, 64, 5, 7), "cpu", reps=2, calls=3)
    assert set(results) == {"GN", "BCN"}
    for times in results.values():
        assert all(len(times[kind]) == 2 for kind in tool.TIMES)
        for mode in ("train", "infer"):
            assert all(0 < host <= wall for host, wall in zip(times[f"{mode} host"], times[f"{mode} wall"]))
    table = tool.format_table({"small": results})
    assert table.count("| small |") == 2 and "x)" in table  # BCN's cells carry their ratio to GN
