"""The tools start quietly: the warnings that tools/_startup.py knows to be harmless are hidden where detectron2
raises them, and only there."""
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT_WARNING = "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`."
TRACER_BOOL = "Converting a tensor to a Python boolean might cause the trace to be incorrect."
HIDDEN = [  # (message, category, the module a warning is attributed to)
    (SCRIPT_WARNING, "FutureWarning", "torch.jit._script"),
    ("torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument.", "UserWarning",
     "torch.functional"),
    ("The given NumPy array is not writable, and PyTorch does not support non-writable tensors.", "UserWarning",
     "detectron2.data.detection_utils"),
    (TRACER_BOOL, "torch.jit.TracerWarning", "detectron2.structures.boxes"),
    ("Iterating over a tensor might cause the trace to be incorrect.", "torch.jit.TracerWarning",
     "detectron2.structures.boxes"),
    (TRACER_BOOL, "torch.jit.TracerWarning", "torch"),  # torch._assert, called by detectron2
]  # fmt: skip


SHOWN = [  # other warnings of the same modules, and the hidden ones raised elsewhere
    ("`torch.jit.trace` is deprecated.", "FutureWarning", "torch.jit._script"),
    ("another warning", "UserWarning", "torch.functional"),
    ("a tracer warning", "torch.jit.TracerWarning", "torch"),
    *dict.fromkeys((message, category, "mymodule") for message, category, _ in HIDDEN),
]


def warnings_printed(warnings: list) -> str:
    """stderr of a fresh interpreter that imports tools/_startup.py, then raises each (message, category, module)."""
    code = f"import sys; sys.path.insert(0, {REPO + '/tools'!r}); import _startup, warnings, torch\n" + "".join(
        f"warnings.warn_explicit({message!r}, {category}, 'source.py', 1, module={module!r})\n"
        for message, category, module in warnings
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr


def test_startup_filter_hides_only_known_harmless_warnings():
    printed = warnings_printed(HIDDEN + SHOWN)
    for message, category, module in SHOWN:  # each hidden message once: from "mymodule"
        assert printed.count(message) == 1, (message, module, printed)


@pytest.mark.parametrize("tool", ["train_net.py", "convert_pretrained.py", "export_model.py"])
def test_tools_print_no_warning_at_start(tool):
    run = subprocess.run([sys.executable, f"{REPO}/tools/{tool}", "--help"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and run.stderr == "", run.stderr
