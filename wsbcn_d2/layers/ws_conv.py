"""Weight Standardization (Qiao et al., arXiv 1903.10520, Sec. 3).

Every output channel ``o`` of a conv weight ``W`` of shape (O, I/groups, kh, kw)
is standardized over its fan-in before the convolution::

    W_hat[o] = (W[o] - mean(W[o])) / s[o]

The sources of WS-pretrained weights disagree on the divisor ``s``, and a
backbone computes its trained function only under its own (trained filters
have small stds, where the forms differ most: at std 1e-3, ``sqrt(var + 1e-5)``
is 3.3x ``std + 1e-5``). The form is therefore part of a layer (:data:`WS_FORMS`):

- ``"std+eps"``: ``s = std + eps``, unbiased std, eps outside the root. The WS
  repository (``R-50-GN-WS.pth.tar`` ...), its maskrcnn-benchmark fork and
  mmcv's ``ConvWS2d``: the default.
- ``"var+eps"``: ``s = sqrt(var + eps)``, unbiased variance. The BCN
  repository's ImageNet models (``rn50_bcn_ws.pth`` ...).
- ``"biased_var+eps"``: ``s = sqrt(var_biased + eps)``. timm's ``StdConv2d``
  (BiT / ResNetV2 weights; eps 1e-8 there).
"""
import math
import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn import functional as F

from . import triton_kernels

__all__ = [
    "WS_FORMS",
    "WSConv2d",
    "WSConvGroup",
    "WSForm",
    "check_ws_form",
    "conv_compute_dtype",
    "export_error",
    "norm_fuses_relu",
    "standardize_weight",
]


class WSForm(NamedTuple):
    """The divisor of a WS form: ``s = sqrt(sum((W - mean)^2) / d + eps_in) + eps_out``."""

    unbiased: bool
    """``d = n - 1`` (unbiased) or ``n`` (biased) over a filter's ``n`` weights."""
    eps_in_root: bool
    """eps inside the square root (``eps_in``) or added to it (``eps_out``)."""


WS_FORMS: Dict[str, WSForm] = {
    "std+eps": WSForm(unbiased=True, eps_in_root=False),  # the WS repository, its detection fork, mmcv
    "var+eps": WSForm(unbiased=True, eps_in_root=True),  # the BCN repository's ImageNet models
    "biased_var+eps": WSForm(unbiased=False, eps_in_root=True),  # timm's StdConv2d (BiT)
}
"""WS form name -> what it computes (see the module docstring for whose weights use it)."""


def check_ws_form(form: str, eps: float) -> None:
    """Raise a ``ValueError`` unless ``form`` is in :data:`WS_FORMS` and ``eps`` is finite and > 0."""
    if form not in WS_FORMS:
        raise ValueError(f"unknown WS form {form!r}; valid forms: {', '.join(repr(f) for f in WS_FORMS)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"WS eps must be a finite number > 0, got {eps!r}")


class _Standardize(torch.autograd.Function):
    """WS on a (O, n) weight with a hand-written backward, for every form of :data:`WS_FORMS`.

    With ``r = sqrt(sum((W - mean)^2) / d + eps_in)`` (the root), ``s = r + eps_out``
    (exactly one of the two eps is non-zero) and ``W_hat`` the output, the
    gradient is, per output channel::

        dW = (g - mean(g)) / s - W_hat * sum(g * W_hat) / (d * r)

    which needs W_hat (already kept alive by the conv) and two reductions of g,
    instead of the several saved tensors and passes autograd would use.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, eps: float, form: str) -> torch.Tensor:
        unbiased, eps_in_root = WS_FORMS[form]
        d = w.shape[1] - 1 if unbiased else w.shape[1]
        # two-pass mean / norm: exact, and far faster on CPU than torch.var_mean's Welford loop
        w_hat = w - w.mean(dim=1, keepdim=True)
        root = torch.linalg.vector_norm(w_hat, dim=1, keepdim=True) / math.sqrt(d)
        if eps_in_root:
            root = root.square_().add_(eps).sqrt_()
            inv_s = root.reciprocal()
        else:
            # clamping only touches exactly-constant filters (0/0 in the backward otherwise)
            root = root.clamp_min(torch.finfo(root.dtype).tiny)
            inv_s = (root + eps).reciprocal()
        w_hat.mul_(inv_s)
        ctx.save_for_backward(w_hat, root, inv_s)
        ctx.d = d
        return w_hat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        w_hat, root, inv_s = ctx.saved_tensors
        g_mean = g.mean(dim=1, keepdim=True)
        g_dot = torch.linalg.vecdot(g, w_hat, dim=1).unsqueeze(1)
        grad = torch.addcmul(-g_mean * inv_s, g, inv_s)
        grad.addcmul_(w_hat, -g_dot / (ctx.d * root))
        return grad, None, None


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5, form: str = "std+eps") -> torch.Tensor:
    """Return ``(W - mean) / s`` per output channel (``s`` by ``form``, :data:`WS_FORMS`), computed
    in float32 or wider.

    Differentiable: gradients reach the raw weight through the standardization.
    Under ``"std+eps"`` a constant filter has std 0 up to rounding: its output is
    float32 rounding noise of the mean times ``1 / (std + eps)`` (about
    ``1e-7 * |W| / eps``), and its gradient is about ``(g - mean(g)) / eps``:
    large, but finite, not NaN (the in-root forms divide by at least ``sqrt(eps)``).
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32)).flatten(1)
    return _Standardize.apply(w, eps, form).view_as(weight).to(weight.dtype)


def conv_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a convolution computes with ``weight`` in: autocast's if enabled, else the weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _StandardizeGroup(torch.autograd.Function):
    """WS of several weights at once, through one flat buffer and the Triton row kernels.

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
        w_hat, root = triton_kernels.ws_rows_forward(flat, row_start, row_len, eps, unbiased, eps_in_root)
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
        grad = triton_kernels.ws_rows_backward(
            _flatten_dense_tensors(grads), w_hat, root, row_start, row_len, *ctx.form_args
        )
        return (None,) * 7 + tuple(_unflatten_dense_tensors(grad.to(ctx.weight_dtype), grads))


class WSConvGroup:
    """Standardizes the weights of several :class:`WSConv2d` together: a few kernels per step.

    On a GPU a step is bound by kernel launches, so standardizing 69 weights one
    by one (about 20 kernels each, forward and backward) costs more than the
    arithmetic. With a group, the first conv that needs its standardized weight
    with a gradient standardizes all members' weights (those that require a
    gradient, on CUDA) in one concatenation and one Triton kernel; the other
    members use their slices. The result serves until a member's weight changes
    (an optimizer step: version counter) or a backward pass consumes it, so two
    forwards before one backward (gradient accumulation) share it, and a
    forward after a backward gets fresh weights. Frozen members, eval and
    ``no_grad`` use each conv's own cache; CPU tensors use the per-conv torch
    path. Gradients are the same as per conv. Under autocast the standardized
    weights come out in the dtype the convs compute in (one cast for the group,
    not one per conv), from the same float32 standardization.
    """

    def __init__(self, convs: Sequence["WSConv2d"]):
        forms = {(conv.form, conv.eps) for conv in convs}
        if len(forms) > 1:
            raise ValueError(f"a WSConvGroup needs one WS form and eps for all its convs, got {sorted(forms)}")
        self.convs = list(convs)
        self.form, self.eps = forms.pop() if forms else ("std+eps", 1e-5)
        self._views: Dict["WSConv2d", Tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._token: Optional[object] = None
        self._rows: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        for conv in self.convs:
            conv.ws_group = self

    def __getstate__(self) -> dict:
        # copies (e.g. copy.deepcopy of the model) start without the autograd-attached results
        return {**self.__dict__, "_views": {}, "_token": None}

    def standardized_weight(self, conv: "WSConv2d") -> torch.Tensor:
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
            if w.requires_grad and triton_kernels.use_triton(w):
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


def _is_relu(activation) -> bool:
    return activation is F.relu_ or activation is F.relu or isinstance(activation, nn.ReLU)


def norm_fuses_relu(norm: Optional[nn.Module]) -> bool:
    """Whether ``norm`` applies a following residual addition and ReLU itself, as
    ``norm(x, residual=z, relu=True)`` (BCN: ``fuses_relu``).

    Read on the class: on a module, ``getattr`` with a default goes through ``Module.__getattr__``
    and an AttributeError for every other norm (~1 us), and convs ask on every forward.
    """
    return getattr(type(norm), "fuses_relu", False)


def export_error(layer: str) -> RuntimeError:
    """The error for scripting or tracing a layer that only exports once folded."""
    return RuntimeError(
        f"{layer} cannot be scripted or traced; export goes through wsbcn_d2.fold_for_inference(model), "
        "which returns plain Conv2d / GroupNorm layers (then torch.jit.trace or detectron2.export)"
    )


class WSConv2d(Conv2d):
    """A :class:`detectron2.layers.Conv2d` whose weight is standardized on every use.

    The raw ``weight`` stays the learnable parameter (WS is a reparameterization),
    ``bias``, ``norm`` and ``activation`` behave as in the parent class (a
    ReLU activation runs inside a BCN norm: ``BatchChannelNorm2d.fuses_relu``), and
    ``forward`` may add a residual before the activation (inside a BCN too). When no
    gradient has to flow into the weight (``torch.no_grad``, eval, or a frozen
    layer) the standardized weight is cached and reused, across ``train()`` /
    ``eval()`` calls, until the raw weight changes: an optimizer step, an
    in-place edit, ``load_state_dict`` or a device/dtype move, detected through
    the weight's version counter and storage (a write through ``weight.data``
    bypasses both: edit weights under ``torch.no_grad()`` instead). In training
    on CUDA, convs of one :class:`WSConvGroup` are standardized together.
    Export goes through :func:`wsbcn_d2.fold_for_inference`.
    """

    def __init__(self, *args, eps: float = 1e-5, form: str = "std+eps", **kwargs):
        """
        Args:
            args, kwargs: as :class:`detectron2.layers.Conv2d` (including ``norm``
                and ``activation``).
            eps: the eps of the WS form.
            form: a name of :data:`WS_FORMS`: where ``eps`` goes and which variance;
                pretrained weights need the form they were trained with.
        """
        super().__init__(*args, **kwargs)
        self._init_standardization(eps, form)

    def _init_standardization(self, eps: float, form: str) -> None:
        check_ws_form(form, eps)
        self.eps, self.form = eps, form
        self.ws_group: Optional[WSConvGroup] = None
        self._cached_weight: Optional[torch.Tensor] = None
        self._cache_key: Optional[Tuple] = None  # (raw weight, its version, storage, dtype, eps, form)

    @classmethod
    def convert_(cls, conv: Conv2d, eps: float = 1e-5, form: str = "std+eps") -> "WSConv2d":
        """Turn a ``detectron2.layers.Conv2d`` into a WSConv2d, in place.

        Like ``torch.nn.utils.parametrize``, this switches the module's class, so
        parameters, hooks and every reference to the module stay valid
        (detectron2's FPN and heads keep plain lists of their convs).
        """
        if type(conv) is not Conv2d:
            raise TypeError(f"expected a detectron2.layers.Conv2d, got {type(conv).__name__}")
        conv.__class__ = cls
        conv._init_standardization(eps, form)
        return conv

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses: ``standardize_weight(self.weight, self.eps, self.form)``."""
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled():
            if self.ws_group is not None and triton_kernels.use_triton(w):
                return self.ws_group.standardized_weight(self)
            return standardize_weight(w, self.eps, self.form)
        key = (w._version, w.data_ptr(), w.dtype, self.eps, self.form)
        if self._cache_key is None or self._cache_key[0] is not w or self._cache_key[1:] != key:
            # built outside inference mode, so the cache can serve later grad-mode calls too
            with torch.inference_mode(False), torch.no_grad():
                self._cached_weight = standardize_weight(w, self.eps, self.form)
            self._cache_key = (w, *key)
        return self._cached_weight

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``activation(norm(conv(x)) + residual)``; ``residual`` (e.g. a ResNet block's shortcut) is optional."""
        if torch.jit.is_tracing():
            raise export_error(type(self).__name__)
        x = self._conv_forward(x, self.standardized_weight(), self.bias)
        activation = self.activation
        if norm_fuses_relu(self.norm):  # a BCN: the residual and a ReLU in its own kernels
            relu = _is_relu(activation)
            x = self.norm(x, residual=residual, relu=relu)
            if relu:
                return x
        else:
            if self.norm is not None:
                x = self.norm(x)
            if residual is not None:
                x += residual
        return x if activation is None else activation(x)

    def __prepare_scriptable__(self):
        raise export_error(type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, form={self.form!r}"
