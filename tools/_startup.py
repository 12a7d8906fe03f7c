"""Imported first by every tool: hides the warnings that detectron2 code raises under torch >= 2.14 and that a
user can do nothing about, each by its message, category and the module it is attributed to:

* ``torch.jit.script`` is deprecated (FutureWarning): detectron2's own import-time scripting;
* ``torch.meshgrid`` without ``indexing`` (UserWarning): detectron2's anchor generator relies on the default "ij";
* a non-writable NumPy array (UserWarning) in detectron2's RLE mask reading, whose tensor is copied at once;
* the tracer's warnings on detectron2's Python-side shape logic and asserts (TracerWarning), while
  tools/export_model.py traces: the tool checks the exported graph against PyTorch on every sample.

Every other warning, including the tracer's on wsbcn_d2 or user code, is shown as usual.
"""
import warnings

from torch.jit import TracerWarning

warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning, module=r"torch\.jit\._script"
)
warnings.filterwarnings(
    "ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning, module=r"torch\.functional"
)
warnings.filterwarnings(
    "ignore", message=r"The given NumPy array is not writable", category=UserWarning,
    module=r"detectron2\.data\.detection_utils",
)  # fmt: skip
warnings.filterwarnings("ignore", category=TracerWarning, module=r"detectron2\.")
# torch._assert, which detectron2's poolers and assert_fx_safe call
warnings.filterwarnings(
    "ignore", message=r"Converting a tensor to a Python boolean", category=TracerWarning, module=r"torch$"
)
