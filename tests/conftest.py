import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
# tools/_startup.py, which every tool imports first (as a script, tools/ is on its path)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU, the Triton kernels are tested on CPU tensors through Triton's interpreter,
# which must be chosen before triton is first imported.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    # third-party deprecation noise (torch.jit.script in detectron2, pkg_resources in model_zoo)
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning:torch.jit._script")
    config.addinivalue_line("filterwarnings", "ignore:pkg_resources is deprecated:UserWarning")
    config.addinivalue_line(
        "markers", "numerics: compares rounded results across code paths (tests/numerics_sweep.py runs these under "
        "each CPU capability)"
    )
