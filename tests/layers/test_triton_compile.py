"""Every kernel launch the launchers make compiles for a CUDA GPU (sm_90: H100, H200), on a machine without one.

CI runs the kernels through Triton's interpreter, which is not Triton's compiler: triton 3.8's
compiler segfaulted on the backward group kernel launched with 2 warps for 4 to 32 channels per
group (when it may not assume C % 16 == 0 and aligned pointers), which the interpreter ran
correctly. tools/compile_kernels.py records the launches of every launcher over ResNet-like
shapes and dtypes and compiles each down to a cubin, unspecialized and with the divisibility
by 16 that Triton's JIT assumes (``--arch 80 90`` for more architectures: about 3.5 min).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from wsbcn_d2.cuda import bcn_kernels, launcher, ws_kernels


@pytest.mark.skipif(launcher.triton is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests compile the kernels for it")
def test_every_launch_compiles_for_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, no cache hits
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "compile_kernels.py"), "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    launches = int(re.search(r"(\d+) distinct launches", proc.stdout).group(1))
    cubins = [int(size) for size in re.findall(r"cubin (\d+) bytes", proc.stdout)]
    assert launches > 100 and len(cubins) == launches and min(cubins) > 0
    kernels = {name for name in re.findall(r"sm_\d+ (_\w+)\(", proc.stdout)}
    every_kernel = {n for module in (ws_kernels, bcn_kernels) for n in vars(module) if n.endswith("_kernel")}
    assert kernels == every_kernel  # every kernel is covered
