"""WSConv2d against an independent float64 statement of the official formula."""
import pytest
import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.nn import functional as F

from wsbcn_d2.layers import WSConv2d

EPS = 1e-5


def reference_standardize(weight: torch.Tensor) -> torch.Tensor:
    """Official code, restated: unbiased std over each filter, eps outside the root."""
    w = weight.double()
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        f = w[o]
        n = f.numel()
        mean = f.sum() / n
        std = (((f - mean) ** 2).sum() / (n - 1)).sqrt()
        out[o] = (f - mean) / (std + EPS)
    return out


def reference_conv(conv: WSConv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), reference_standardize(weight), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


CASES = {
    "plain": dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    "grouped": dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, groups=4),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    "strided": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, stride=2),
    "dilated": dict(in_channels=8, out_channels=12, kernel_size=3, padding=2, dilation=2),
    "1x1": dict(in_channels=8, out_channels=12, kernel_size=1, bias=True),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_and_weight_grad_match_float64_formula(case):
    torch.manual_seed(0)
    conv = WSConv2d(**CASES[case])
    x = torch.randn(2, 8, 9, 11)
    out = conv(x)

    w64 = conv.weight.detach().double().requires_grad_()
    ref = reference_conv(conv, x, w64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)

    grad_out = torch.randn_like(ref)
    out.backward(grad_out.float())
    ref.backward(grad_out)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_norm_activation_and_empty_input_as_parent():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8)
    conv = WSConv2d(4, 8, 3, padding=1, bias=False, norm=norm, activation=F.relu)
    x = torch.randn(2, 4, 6, 6)
    expected = F.relu(norm(reference_conv(conv, x, conv.weight.detach()).float()))
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)
    assert conv(torch.zeros(0, 4, 6, 6)).shape == (0, 8, 6, 6)


def test_eval_caches_but_follows_weight_updates():
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, 3).eval()
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        conv(x)
        assert conv.standardized_weight() is conv.standardized_weight()  # not recomputed

        conv.weight.mul_(torch.rand_like(conv.weight))  # in-place edit
        torch.testing.assert_close(conv(x).double(), reference_conv(conv, x, conv.weight), rtol=1e-4, atol=1e-4)

    conv.train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(x).square().sum().backward()
    opt.step()  # optimizer update
    conv.eval()
    with torch.inference_mode():
        torch.testing.assert_close(conv(x).double(), reference_conv(conv, x, conv.weight), rtol=1e-4, atol=1e-4)

    other = WSConv2d(4, 6, 3)
    conv.load_state_dict(other.state_dict())  # load_state_dict
    with torch.no_grad():
        torch.testing.assert_close(conv(x), other(x), rtol=1e-5, atol=1e-6)
        conv.double()  # dtype move
        out = conv(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_conv(conv, x, conv.weight), rtol=1e-6, atol=1e-6)


def test_cache_built_under_inference_mode_serves_frozen_layer_in_grad_mode():
    conv = WSConv2d(4, 6, 3).requires_grad_(False)
    x = torch.randn(1, 4, 7, 7, requires_grad=True)
    with torch.inference_mode():
        conv(x.detach())
    conv(x).sum().backward()  # would fail if the cached weight were an inference tensor
    assert x.grad is not None and conv.weight.grad is None


def test_constant_filter_gives_no_nan():
    conv = WSConv2d(3, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight[1].fill_(0.7)
    out = conv(torch.randn(1, 3, 5, 5))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(conv.weight.grad).all()
    # zeros up to float32 rounding of the mean, amplified by 1 / eps
    assert conv.standardized_weight()[1].abs().max() < 1e-2


def test_autocast_standardizes_in_float32():
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = conv.standardized_weight()
        out = conv(x)
    assert weight.dtype == torch.float32
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference_conv(conv, x, conv.weight.detach()), rtol=0.05, atol=0.1)


def test_convert_in_place_keeps_parameters_and_references():
    conv = Conv2d(4, 6, 3, bias=False, norm=nn.GroupNorm(2, 6))
    holder = [conv]
    weight = conv.weight
    WSConv2d.convert_(conv, eps=1e-3)
    assert isinstance(holder[0], WSConv2d) and holder[0].weight is weight and conv.eps == 1e-3
    with pytest.raises(ValueError, match="eps"):
        WSConv2d(4, 6, 3, eps=0.0)
