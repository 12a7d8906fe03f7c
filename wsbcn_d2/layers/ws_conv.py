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
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from detectron2.layers import Conv2d

from .checks import check_eps

__all__ = [
    "WS_FORMS",
    "WSConv2d",
    "WSForm",
    "check_ws_form",
    "conv_compute_dtype",
    "export_error",
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


def check_ws_form(form: str, eps: float, form_name: str = "WS form", eps_name: str = "WS eps") -> None:
    """Raise a ``ValueError`` naming ``form_name`` or ``eps_name`` (e.g. config keys) unless ``form`` is in
    :data:`WS_FORMS` and ``eps`` is a finite number > 0."""
    if form not in WS_FORMS:
        raise ValueError(f"unknown {form_name} {form!r}; valid forms: {', '.join(repr(f) for f in WS_FORMS)}")
    check_eps(eps, eps_name)


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


def export_error(layer: str) -> RuntimeError:
    """The error for scripting or tracing a layer that only exports once folded."""
    return RuntimeError(
        f"{layer} cannot be scripted or traced; export goes through wsbcn_d2.fold_for_inference(model), "
        "which returns plain Conv2d / GroupNorm layers (then torch.jit.trace or detectron2.export)"
    )


class WSConv2d(Conv2d):
    """A :class:`detectron2.layers.Conv2d` whose weight is standardized on every use.

    The raw ``weight`` stays the learnable parameter (WS is a reparameterization);
    ``bias``, ``norm`` and ``activation`` behave as in the parent class. When no
    gradient has to flow into the weight (``torch.no_grad``, eval, or a frozen
    layer) the standardized weight is cached and reused, across ``train()`` /
    ``eval()`` calls, until the raw weight changes: an optimizer step, an
    in-place edit, ``load_state_dict`` or a device/dtype move, detected through
    the weight's version counter and storage (a write through ``weight.data``
    bypasses both: edit weights under ``torch.no_grad()`` instead). This torch
    code is the CPU path and the reference of the CUDA fast path
    (:mod:`wsbcn_d2.cuda`). Export goes through :func:`wsbcn_d2.fold_for_inference`.
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
            return standardize_weight(w, self.eps, self.form)
        key = (w._version, w.data_ptr(), w.dtype, self.eps, self.form)
        if self._cache_key is None or self._cache_key[0] is not w or self._cache_key[1:] != key:
            # built outside inference mode, so the cache can serve later grad-mode calls too
            with torch.inference_mode(False), torch.no_grad():
                self._cached_weight = standardize_weight(w, self.eps, self.form)
            self._cache_key = (w, *key)
        return self._cached_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``activation(norm(conv(x)))`` with the standardized weight."""
        if torch.jit.is_tracing():
            raise export_error(type(self).__name__)
        x = self._conv_forward(x, self.standardized_weight(), self.bias)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.activation is None else self.activation(x)

    def __prepare_scriptable__(self):
        raise export_error(type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, form={self.form!r}"
