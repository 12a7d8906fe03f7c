"""Imported first by every tool: hides the two FutureWarnings that importing detectron2 raises under
torch >= 2.14 (``torch.jit.script`` is deprecated, from detectron2's own import-time scripting), which a
user can do nothing about. Only those: every other warning is shown as usual."""
import warnings

warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning, module=r"torch\.jit\._script"
)
