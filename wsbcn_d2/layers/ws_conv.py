"""Weight Standardization (Qiao et al., arXiv 1903.10520, Sec. 3).

Every output channel ``o`` of a conv weight ``W`` of shape (O, I/groups, kh, kw)
is standardized over its fan-in before the convolution::

    W_hat[o] = (W[o] - mean(W[o])) / (std(W[o]) + eps)

with the *unbiased* std and ``eps`` added outside the square root, exactly as
the paper's official code (and mmcv's ``ConvWS2d``) computes it. timm's
``StdConv2d`` uses the biased variance with eps inside the root instead; the
two differ by a factor sqrt(n / (n - 1)) that the following norm absorbs.
"""
import math
from typing import Optional, Tuple

import torch
from detectron2.layers import Conv2d

__all__ = ["WSConv2d", "standardize_weight"]


class _Standardize(torch.autograd.Function):
    """WS on a (O, n) weight with a hand-written backward.

    With ``s = std + eps`` and ``W_hat`` the output, the gradient of the official
    formula is, per output channel::

        dW = (g - mean(g)) / s - W_hat * sum(g * W_hat) / ((n - 1) * std)

    which needs W_hat (already kept alive by the conv) and two reductions of g,
    instead of the several saved tensors and passes autograd would use.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, eps: float) -> torch.Tensor:
        # two-pass mean / norm: exact, and far faster on CPU than torch.var_mean's Welford loop
        w_hat = w - w.mean(dim=1, keepdim=True)
        std = torch.linalg.vector_norm(w_hat, dim=1, keepdim=True) / math.sqrt(w.shape[1] - 1)
        # clamping only touches exactly-constant filters (0/0 in the backward otherwise)
        std = std.clamp_min(torch.finfo(std.dtype).tiny)
        inv_s = (std + eps).reciprocal()
        w_hat.mul_(inv_s)
        ctx.save_for_backward(w_hat, std, inv_s)
        return w_hat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        w_hat, std, inv_s = ctx.saved_tensors
        n = w_hat.shape[1]
        g_mean = g.mean(dim=1, keepdim=True)
        g_dot = torch.linalg.vecdot(g, w_hat, dim=1).unsqueeze(1)
        grad = torch.addcmul(-g_mean * inv_s, g, inv_s)
        grad.addcmul_(w_hat, -g_dot / ((n - 1) * std))
        return grad, None


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Return ``(W - mean) / (std + eps)`` per output channel, computed in float32 or wider.

    Differentiable: gradients reach the raw weight through the standardization.
    A constant filter maps to zeros with a zero (not NaN) gradient.
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32)).flatten(1)
    return _Standardize.apply(w, eps).view_as(weight).to(weight.dtype)


class WSConv2d(Conv2d):
    """A :class:`detectron2.layers.Conv2d` whose weight is standardized on every use.

    The raw ``weight`` stays the learnable parameter (WS is a reparameterization),
    ``bias``, ``norm`` and ``activation`` behave as in the parent class. When no
    gradient has to flow into the weight (``torch.no_grad``, eval, or a frozen
    layer) the standardized weight is cached and reused until the raw weight
    changes: an optimizer step, an in-place edit, ``load_state_dict`` or a
    device/dtype move all invalidate it, through the weight's version counter
    and storage. Writes through ``weight.data`` bypass the version counter;
    calling ``train()``/``eval()`` after such a write clears the cache.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        """
        Args:
            args, kwargs: as :class:`detectron2.layers.Conv2d` (including ``norm``
                and ``activation``).
            eps: added to the std of each output channel's weight.
        """
        super().__init__(*args, **kwargs)
        self._init_standardization(eps)

    def _init_standardization(self, eps: float) -> None:
        if eps <= 0:
            raise ValueError(f"WSConv2d eps must be > 0, got {eps}")
        self.eps = eps
        self._cached_weight: Optional[torch.Tensor] = None
        self._cache_key: Optional[Tuple] = None  # (raw weight, its version, storage, dtype, eps)

    @classmethod
    def convert_(cls, conv: Conv2d, eps: float = 1e-5) -> "WSConv2d":
        """Turn a ``detectron2.layers.Conv2d`` into a WSConv2d, in place.

        Like ``torch.nn.utils.parametrize``, this switches the module's class, so
        parameters, hooks and every reference to the module stay valid
        (detectron2's FPN and heads keep plain lists of their convs).
        """
        if type(conv) is not Conv2d:
            raise TypeError(f"expected a detectron2.layers.Conv2d, got {type(conv).__name__}")
        conv.__class__ = cls
        conv._init_standardization(eps)
        return conv

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses: ``standardize_weight(self.weight, self.eps)``."""
        if self.weight.requires_grad and torch.is_grad_enabled():
            self._cached_weight = None
            return standardize_weight(self.weight, self.eps)
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, self.eps)
        if self._cache_key is None or self._cache_key[0] is not w or self._cache_key[1:] != key:
            # built outside inference mode, so the cache can serve later grad-mode calls too
            with torch.inference_mode(False), torch.no_grad():
                self._cached_weight = standardize_weight(w, self.eps)
            self._cache_key = (w, *key)
        return self._cached_weight

    def train(self, mode: bool = True) -> "WSConv2d":
        self._cached_weight, self._cache_key = None, None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_forward(x, self.standardized_weight(), self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
