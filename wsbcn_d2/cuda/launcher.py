"""Launching a Triton kernel through its compiled launcher, without Triton's per-call binding.

Triton's ``kernel[grid](*args, **meta)`` binds and specializes every argument on
each call: 18-20 us of host time per launch on an H200 host, against 9 us
through the compiled kernel's own launcher, and a detection step at 1-2 images
per GPU is bound by the host issuing kernels (there, direct launches cut a BCN
layer's forward + backward by 280-380 us of host time).

Contract of :func:`launch`: positional ``args`` are the kernel's non-constexpr
parameters in order, ``meta`` its constexprs and options, and ``key`` (with
``meta``) determines everything Triton specializes on: argument dtypes,
integer values (== 1, % 16 == 0, 32 bits), pointer alignment to 16 bytes, the
device (:func:`launch_key` gives the tensors' part). The first launch of a key
goes through Triton, which compiles or finds the kernel; later ones reuse it.

Fallback: this calls Triton's launcher the way Triton itself does, which
depends on Triton internals (checked with Triton 3.6 and 3.8). Should a Triton
version's launcher take other arguments, the launch goes through Triton and
direct launches stop, with a warning. ``WSBCN_TRITON_DIRECT=0`` launches
everything through Triton (for comparisons).
"""
import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch

try:
    import triton
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

__all__ = ["launch", "launch_key"]

_DIRECT_LAUNCH = os.environ.get("WSBCN_TRITON_DIRECT", "1") != "0"

_COMPILED: Dict[tuple, tuple] = {}
"""By (kernel's Python function, launch key, meta values): ``(compiled kernel, constexpr values, stream
getter)``. Keys hold input shapes: a COCO training run meets some 10^4 (padded image sizes x layers, RoI
counts); past :data:`_MAX_COMPILED` the dict starts over, and launches go through Triton once more to
refill it."""
_MAX_COMPILED = 1 << 16


def launch(kernel, grid: Tuple[int, ...], args: tuple, meta: dict, key: Optional[tuple] = None) -> None:
    """``kernel[grid](*args, **meta)``, launched directly once compiled when ``key`` is given (module docstring).

    Launch metadata and hooks are built only when a profiler has set a hook (:func:`_launch_hooks`).
    """
    if key is not None:
        key = (kernel.fn, key, *meta.values())  # the Python function: a JITFunction hashes in Python
    entry = _COMPILED.get(key) if key is not None else None
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        params = getattr(kernel, "params", None)  # a JITFunction's; the interpreter returns no compiled kernel
        if key is not None and _DIRECT_LAUNCH and params and hasattr(compiled, "packed_metadata"):
            constexprs = tuple(meta[p.name] for p in params[len(args) :] if p.is_constexpr)
            if len(args) + len(constexprs) == len(params) and not any(p.is_constexpr for p in params[: len(args)]):
                if len(_COMPILED) >= _MAX_COMPILED:
                    _COMPILED.clear()
                _COMPILED[key] = (compiled, constexprs, _stream_getter())
        return
    compiled, constexprs, current_stream = entry
    grid3 = grid + (1,) * (3 - len(grid))
    all_args = args + constexprs
    try:
        stream = current_stream(args[0].get_device())
        enter_hook, exit_hook = _launch_hooks()
        # Triton builds the launch metadata whenever its hook chains exist, even empty; it is the hooks' input
        metadata = None if enter_hook is None else compiled.launch_metadata(grid3, stream, *all_args)
        compiled.run(
            *grid3, stream, compiled.function, compiled.packed_metadata, metadata, enter_hook, exit_hook, *all_args
        )
    except (AttributeError, TypeError) as e:  # a Triton whose launcher differs: raised before launching
        _stop_direct_launches(e)
        kernel[grid](*args, **meta)


def launch_key(*tensors: torch.Tensor) -> tuple:
    """Dtypes, 16-byte alignment and device of ``tensors``: with the shapes, what Triton specializes on."""
    return (*[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors], tensors[0].get_device())


def _stop_direct_launches(error: Exception) -> None:
    global _DIRECT_LAUNCH
    _DIRECT_LAUNCH = False
    _COMPILED.clear()
    logging.getLogger(__name__).warning(
        "Triton kernels: direct launches failed (%s: %s) with triton %s; launching through Triton from now on",
        type(error).__name__,
        error,
        triton.__version__,
    )


def _launch_hooks() -> Tuple[Optional[Callable], Optional[Callable]]:
    """Triton's launch enter and exit hooks (a profiler's), or ``(None, None)`` when none is set.

    Triton's launchers call a hook unless it is None; older Triton releases hold None or a plain
    callable, newer ones a chain (``HookChain``, with a ``calls`` list), never None but usually
    empty: so 3.6 and 3.8 (checked in their wheels).
    """
    hooks = triton.knobs.runtime
    enter_hook, exit_hook = hooks.launch_enter_hook, hooks.launch_exit_hook
    if getattr(enter_hook, "calls", enter_hook) or getattr(exit_hook, "calls", exit_hook):
        return enter_hook, exit_hook
    return None, None


def _stream_getter() -> Callable[[int], int]:
    """Triton's ``device index -> current CUDA stream`` (torch's current stream)."""
    return triton.runtime.driver.active.get_current_stream
