"""WS of many convs at once: one flat buffer and one kernel per pass, whatever the number of convs."""
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..layers.ws_conv import WS_FORMS, WSConv2d, conv_compute_dtype
from . import dispatch
from .ws_kernels import ws_rows_backward, ws_rows_forward

__all__ = ["GroupedWSConv2d", "WSConvGroup"]


class _StandardizeGroup(torch.autograd.Function):
    """WS of several weights at once, through one flat buffer and the row kernels.

    One autograd node for all the weights (no per-weight split or view nodes).
    The standardized weights come out in ``out_dtype`` (under autocast, the
    dtype the convs compute in: one cast of the flat buffer instead of one per
    conv); the gradients go back in the weights' dtype. When its backward runs,
    the group's standardized weights have been consumed by a backward pass and
    the group computes new ones on the next forward.
    """

    @staticmethod
    def forward(ctx, row_start, row_len, eps: float, form: str, out_dtype, group_ref, token, *weights: torch.Tensor):
        # flatten / unflatten: torch's C++ loops (as DDP's buckets use), not one Python call per weight
        flat = _flatten_dense_tensors(weights)
        unbiased, eps_in_root = WS_FORMS[form]
        w_hat, root = ws_rows_forward(flat, row_start, row_len, eps, unbiased, eps_in_root)
        ctx.save_for_backward(w_hat, root, row_start, row_len)
        ctx.form_args = (eps, unbiased, eps_in_root)
        ctx.group_ref, ctx.token, ctx.weight_dtype = group_ref, token, weights[0].dtype
        return tuple(_unflatten_dense_tensors(w_hat.to(out_dtype), weights))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        group = ctx.group_ref()
        if group is not None:
            group.release(ctx.token)
        w_hat, root, row_start, row_len = ctx.saved_tensors
        grad = ws_rows_backward(_flatten_dense_tensors(grads), w_hat, root, row_start, row_len, *ctx.form_args)
        non_tensor_inputs = 7
        return (None,) * non_tensor_inputs + tuple(_unflatten_dense_tensors(grad.to(ctx.weight_dtype), grads))


class WSConvGroup:
    """Standardizes the weights of several :class:`WSConv2d` together: a few kernels per step.

    On a GPU a step is bound by kernel launches, so standardizing 69 weights one
    by one (about 20 kernels each, forward and backward) costs more than the
    arithmetic. With a group, the first conv that needs its standardized weight
    with a gradient standardizes all members' weights (those that require a
    gradient, on CUDA) in one concatenation and one kernel; the other members
    use their slices. The result serves until a member's weight changes (an
    optimizer step: version counter) or a backward pass consumes it, so two
    forwards before one backward (gradient accumulation) share it, and a
    forward after a backward gets fresh weights. Frozen members, eval and
    ``no_grad`` use each conv's own cache; CPU tensors the conv's torch code.
    Gradients are the same as per conv. Under autocast the standardized weights
    come out in the dtype the convs compute in (one cast for the group, not one
    per conv), from the same float32 standardization.

    Joining a group makes a member a :class:`GroupedWSConv2d` (in place).
    """

    def __init__(self, convs: Sequence[WSConv2d]):
        forms = {(conv.form, conv.eps) for conv in convs}
        if len(forms) > 1:
            raise ValueError(f"a WSConvGroup needs one WS form and eps for all its convs, got {sorted(forms)}")
        self.convs = list(convs)
        self.form, self.eps = forms.pop() if forms else ("std+eps", 1e-5)
        self._views: Dict[WSConv2d, Tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._token: Optional[object] = None
        self._rows: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        for conv in self.convs:
            if not isinstance(conv, GroupedWSConv2d):
                conv.__class__ = GroupedWSConv2d
            conv.ws_group = self

    def __getstate__(self) -> dict:
        # copies (e.g. copy.deepcopy of the model) start without the autograd-attached results
        return {**self.__dict__, "_views": {}, "_token": None}

    def standardized_weight(self, conv: WSConv2d) -> torch.Tensor:
        """``conv``'s standardized weight, in :func:`conv_compute_dtype`, from the group's current
        result (computed if stale)."""
        w = conv.weight
        dtype = conv_compute_dtype(w)
        entry = self._views.get(conv)
        if entry is None or entry[1] is not w or entry[2] != w._version or entry[0].dtype != dtype:
            self._standardize()
            entry = self._views[conv]
        return entry[0]

    def release(self, token: object) -> None:
        """Drop the current result if ``token`` is its (called when its backward runs)."""
        if token is self._token:
            self._views, self._token = {}, None

    def _standardize(self) -> None:
        members: Dict[Tuple, list] = {}
        for conv in self.convs:
            w = conv.weight
            if w.requires_grad and dispatch.use_kernels(w):
                members.setdefault((w.device, w.dtype), []).append(conv)
        self._views, self._token = {}, object()
        for convs in members.values():
            weights = [conv.weight for conv in convs]
            row_start, row_len = self._row_table(weights)
            out_dtype = conv_compute_dtype(weights[0])
            outputs = _StandardizeGroup.apply(
                row_start, row_len, self.eps, self.form, out_dtype, weakref.ref(self), self._token, *weights
            )
            for conv, w, out in zip(convs, weights, outputs):
                self._views[conv] = (out, w, w._version)

    def _row_table(self, weights: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Start and length of every output channel's row in the flat buffer (cached per layout)."""
        key = tuple((w.shape, w.device) for w in weights)
        if key not in self._rows:
            starts, lengths, offset = [], [], 0
            for w in weights:
                fan_in = w[0].numel()
                starts.append(offset + torch.arange(w.shape[0], dtype=torch.int64) * fan_in)
                lengths.append(torch.full((w.shape[0],), fan_in, dtype=torch.int32))
                offset += w.numel()
            device = weights[0].device
            self._rows[key] = (torch.cat(starts).to(device), torch.cat(lengths).to(device))
        return self._rows[key]


class GroupedWSConv2d(WSConv2d):
    """A :class:`WSConv2d` of a :class:`WSConvGroup`: in training on CUDA its standardized weight comes
    from the group's kernels, otherwise from the WSConv2d's own code."""

    ws_group: WSConvGroup

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled() and dispatch.use_kernels(w):
            return self.ws_group.standardized_weight(self)
        return super().standardized_weight()
