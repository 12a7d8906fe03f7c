"""WSConv2d against an independent float64 statement of the official formula."""
import pytest
import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.nn import functional as F

import helpers
from wsbcn_d2.layers import WSConv2d, standardize_weight

pytestmark = pytest.mark.numerics
EPS = 1e-5


def reference_standardize(weight: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Official code, restated in ``dtype``: unbiased std over each filter, eps outside the root."""
    w = weight.to(dtype)
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        f = w[o]
        n = f.numel()
        mean = f.sum() / n
        std = (((f - mean) ** 2).sum() / (n - 1)).sqrt()
        out[o] = (f - mean) / (std + EPS)
    return out


def reference_conv(conv: WSConv2d, x: torch.Tensor, weight: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.to(dtype)
    w_hat = reference_standardize(weight, dtype)
    return F.conv2d(x.to(dtype), w_hat, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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

    # the formula in float32 (the yardstick of rounding) and float64
    w32, w64 = (conv.weight.detach().to(dtype).requires_grad_() for dtype in (torch.float32, torch.float64))
    ref32, ref = reference_conv(conv, x, w32, torch.float32), reference_conv(conv, x, w64)
    helpers.assert_as_accurate(out, ref32, ref, msg="output")

    grad_out = torch.randn_like(ref)
    for y in (out, ref32, ref):
        y.backward(grad_out.to(y.dtype))
    helpers.assert_as_accurate(conv.weight.grad, w32.grad, w64.grad, msg="weight gradient")


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

    def check():
        with torch.no_grad():
            torch.testing.assert_close(conv(x).double(), reference_conv(conv, x, conv.weight), rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        conv(x)
        cached = conv.standardized_weight()
        conv.train().eval()  # a serving loop calling eval() before every call keeps the cache
        assert conv.standardized_weight() is cached
        conv.weight.mul_(torch.rand_like(conv.weight))  # in-place edit
    check()

    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()  # an optimizer update without any mode switch
    check()

    other = WSConv2d(4, 6, 3)
    conv.load_state_dict(other.state_dict())  # load_state_dict
    with torch.no_grad():
        torch.testing.assert_close(conv(x), other(x), rtol=1e-5, atol=1e-6)
        conv.double()  # dtype move
        out = conv(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, reference_conv(conv, x, conv.weight), rtol=1e-6, atol=1e-6)
        conv.to("meta")  # device move: a stale CPU weight would not run on a meta input
        assert conv(x.double().to("meta")).device.type == "meta"


def test_cache_built_under_inference_mode_serves_frozen_layer_in_grad_mode():
    conv = WSConv2d(4, 6, 3).requires_grad_(False)
    x = torch.randn(1, 4, 7, 7, requires_grad=True)
    with torch.inference_mode():
        conv(x.detach())
    conv(x).sum().backward()  # would fail if the cached weight were an inference tensor
    assert x.grad is not None and conv.weight.grad is None


def test_constant_filter_gives_finite_values_and_gradient():
    weight = torch.randn(4, 3, 3, 3)
    weight[1] = 0.7
    weight.requires_grad_()
    w_hat = standardize_weight(weight, EPS)
    grad = torch.randn_like(w_hat)
    w_hat.backward(grad)
    assert torch.isfinite(w_hat).all() and torch.isfinite(weight.grad).all()
    # zeros up to float32 rounding of the mean, amplified by 1 / eps; gradient about (g - mean g) / eps
    # (the rounding noise's std, ~1e-7, adds to eps)
    assert w_hat[1].abs().max() < 1e-2
    torch.testing.assert_close(weight.grad[1], (grad[1] - grad[1].mean()) / EPS, rtol=0.02, atol=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_standardizes_in_float32(dtype):
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        weight = conv.standardized_weight()
        out = conv(x)
    # in float32: as close to the float64 formula as the float32 formula (a 16-bit standardization is ~1e-2 off)
    w = conv.weight.detach()
    helpers.assert_as_accurate(weight, reference_standardize(w, torch.float32), reference_standardize(w), msg="W_hat")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference_conv(conv, x, conv.weight.detach()), rtol=0.05, atol=0.1)


def test_scripting_or_tracing_points_to_folding():
    conv = WSConv2d(4, 6, 3, norm=nn.GroupNorm(2, 6)).eval()
    with pytest.raises(RuntimeError, match="fold_for_inference"):
        torch.jit.script(conv)
    with pytest.raises(RuntimeError, match="fold_for_inference"):
        torch.jit.trace(conv, torch.randn(1, 4, 6, 6))


FORM_CASES = [("std+eps", 1e-5), ("var+eps", 1e-5), ("biased_var+eps", 1e-8), ("biased_var+eps", 1e-6)]


@pytest.mark.parametrize("form, eps", FORM_CASES, ids=[f"{f}-{e:g}" for f, e in FORM_CASES])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (12, 64, 1, 1), (6, 3, 7, 7)], ids=str)
def test_each_form_matches_its_source_in_float64(form, eps, shape):
    """Values and gradients of every WS form against the source's own line, on trained-size filters."""
    weight = helpers.trained_ws_filters_(torch.empty(shape, dtype=torch.float64), torch.Generator().manual_seed(0))
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = weight.clone().requires_grad_()
    w_hat = standardize_weight(w, eps, form)
    (w_hat * grad).sum().backward()
    ref_w = weight.clone().requires_grad_()
    ref = helpers.WS_SOURCE_LINES[form](ref_w, eps)
    (ref * grad).sum().backward()
    torch.testing.assert_close(w_hat, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-9, atol=1e-9 * ref_w.grad.abs().max().item())


def test_forms_differ_where_trained_filters_are():
    """At std 1e-3 the forms are far apart (so loading under the wrong one is a large error)."""
    weight = torch.randn(4, 64, 3, 3, dtype=torch.float64) * 1e-3
    per_form = {form: standardize_weight(weight, 1e-5, form) for form in ("std+eps", "var+eps")}
    ratio = per_form["std+eps"].flatten(1).std(dim=1) / per_form["var+eps"].flatten(1).std(dim=1)
    std = weight.flatten(1).std(dim=1)
    torch.testing.assert_close(ratio, (std**2 + 1e-5).sqrt() / (std + 1e-5), rtol=1e-9, atol=0)
    assert ratio.min() > 3.0  # about 3.3 at std 1e-3


@pytest.mark.parametrize("form", ["std+eps", "var+eps", "biased_var+eps"])
def test_conv_and_its_eval_cache_use_the_form(form):
    weight = helpers.trained_ws_filters_(torch.empty(6, 4, 3, 3), torch.Generator().manual_seed(0))
    conv = WSConv2d(4, 6, 3, bias=False, eps=1e-5, form=form)
    with torch.no_grad():
        conv.weight.copy_(weight)
    x = torch.randn(2, 4, 7, 7)
    expected = F.conv2d(x.double(), helpers.WS_SOURCE_LINES[form](weight.double(), 1e-5))
    torch.testing.assert_close(conv(x).double(), expected, rtol=1e-4, atol=1e-5)  # training: no cache
    with torch.no_grad():
        conv.eval()(x)
        torch.testing.assert_close(conv(x).double(), expected, rtol=1e-4, atol=1e-5)  # the cached weight
    assert f"form='{form}'" in repr(conv)


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match=r"unknown WS form 'std'; valid forms: 'std\+eps', 'var\+eps'"):
        WSConv2d(4, 6, 3, form="std")


def test_convert_in_place_keeps_parameters_and_references():
    conv = Conv2d(4, 6, 3, bias=False, norm=nn.GroupNorm(2, 6))
    holder = [conv]
    weight = conv.weight
    WSConv2d.convert_(conv, eps=1e-3, form="var+eps")
    assert isinstance(holder[0], WSConv2d) and holder[0].weight is weight
    assert (conv.eps, conv.form) == (1e-3, "var+eps")
    with pytest.raises(ValueError, match="eps"):
        WSConv2d(4, 6, 3, eps=0.0)
