"""The tools start quietly: detectron2's import-time torch.jit.script deprecation warnings are hidden,
and only those."""
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT_WARNING = "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`."


def warnings_printed(message: str, module: str) -> str:
    """stderr of a fresh interpreter that imports tools/_startup.py, then raises ``message`` from ``module``."""
    code = (
        f"import sys; sys.path.insert(0, {REPO + '/tools'!r}); import _startup, warnings; "
        f"warnings.warn_explicit({message!r}, FutureWarning, '_script.py', 1491, module={module!r})"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr


def test_startup_filter_hides_only_detectron2_jit_script_warnings():
    assert warnings_printed(SCRIPT_WARNING, "torch.jit._script") == ""
    assert SCRIPT_WARNING in warnings_printed(SCRIPT_WARNING, "mymodule")  # the same text from elsewhere
    assert "trace` is deprecated" in warnings_printed("`torch.jit.trace` is deprecated.", "torch.jit._script")


@pytest.mark.parametrize("tool", ["train_net.py", "convert_pretrained.py", "export_model.py"])
def test_tools_print_no_warning_at_start(tool):
    run = subprocess.run([sys.executable, f"{REPO}/tools/{tool}", "--help"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and run.stderr == "", run.stderr
