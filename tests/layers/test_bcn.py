"""BatchChannelNorm2d against an independent re-statement of the official code: in float64 the reference,
in the module's dtype the yardstick of the module's rounding error (helpers.assert_as_accurate)."""
import copy

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d

import helpers
from wsbcn_d2.layers import BatchChannelNorm2d

pytestmark = pytest.mark.numerics
C, G = 8, 4


class ReferenceBCN:
    """The official BCNorm / EstBN (and BatchNorm2d for large-batch), in ``dtype`` (inputs of that dtype)."""

    def __init__(self, module: BatchChannelNorm2d, estimate: bool, rate: float, dtype=torch.float64):
        bn = module.batch_norm
        self.estimate, self.rate = estimate, rate
        self.running_mean = bn.running_mean.to(dtype).clone()
        self.running_var = bn.running_var.to(dtype).clone()
        params = (bn.weight, bn.bias, module.weight, module.bias)
        self.params = [p.detach().to(dtype).clone().requires_grad_() for p in params]

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        bn_w, bn_b, group_w, group_b = self.params
        flat = x.transpose(0, 1).reshape(C, -1)
        if self.estimate:
            if training:
                with torch.no_grad():
                    mean = flat.mean(dim=1)
                    centered = flat - self.running_mean.view(-1, 1)
                    var = (centered * centered).mean(dim=1)
                    self.running_mean = self.running_mean * (1 - self.rate) + self.rate * mean
                    self.running_var = self.running_var * (1 - self.rate) + self.rate * var
            mean, var = self.running_mean, self.running_var
        elif training:
            mean, var = flat.mean(dim=1), flat.var(dim=1, unbiased=False)
            n = flat.shape[1]
            with torch.no_grad():
                self.running_mean = 0.9 * self.running_mean + 0.1 * mean
                self.running_var = 0.9 * self.running_var + 0.1 * var * n / (n - 1)
        else:
            mean, var = self.running_mean, self.running_var
        out = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
        out = out * bn_w.view(1, -1, 1, 1) + bn_b.view(1, -1, 1, 1)
        n = x.shape[0]
        out = out.reshape(1, n * G, -1)
        out = (out - out.mean(dim=2, keepdim=True)) / torch.sqrt(out.var(dim=2, unbiased=False, keepdim=True) + 1e-5)
        out = out.view(n, G, -1) * group_w.view(1, G, 1) + group_b.view(1, G, 1)
        return out.view_as(x)


def randomized_bcn(estimate: bool, rate: float = 0.3) -> BatchChannelNorm2d:
    return helpers.randomized_bcn(C, G, estimate, rate)


@pytest.mark.parametrize("estimate", [True, False])
def test_matches_official_code_over_steps_then_eval(estimate):
    module = randomized_bcn(estimate)
    ref32, ref = ReferenceBCN(module, estimate, 0.3, torch.float32), ReferenceBCN(module, estimate, 0.3)
    for step, batch in enumerate([1, 2, 1, 2, 2]):
        x = (torch.randn(batch, C, 5, 6) * 3 + step).requires_grad_()
        x32, x64 = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
        out, expected32, expected = module(x), ref32(x32, training=True), ref(x64, training=True)
        helpers.assert_as_accurate(out, expected32, expected, msg=f"output, step {step}")
        for key in ("running_mean", "running_var"):
            estimates = (getattr(module.batch_norm, key), getattr(ref32, key), getattr(ref, key))
            helpers.assert_as_accurate(*estimates, msg=f"{key}, step {step}")

        grad = torch.randn_like(expected)
        module.zero_grad()
        for y, g in ((out, grad.float()), (expected32, grad.float()), (expected, grad)):
            y.backward(g)
        helpers.assert_as_accurate(x.grad, x32.grad, x64.grad, msg=f"dx, step {step}")
        params = (module.batch_norm.weight, module.batch_norm.bias, module.weight, module.bias)
        for p, p32, p64 in zip(params, ref32.params, ref.params):
            helpers.assert_as_accurate(p.grad, p32.grad, p64.grad, msg=f"parameter gradient, step {step}")
            p32.grad = p64.grad = None

    module.eval()
    x = torch.randn(2, C, 5, 6)
    stats = module.batch_norm.running_mean.clone()
    helpers.assert_as_accurate(module(x), ref32(x, training=False), ref(x.double(), training=False), msg="eval")
    assert torch.equal(stats, module.batch_norm.running_mean)


def test_no_gradient_through_estimates():
    module = randomized_bcn(estimate=True)
    bn = module.batch_norm
    x = (torch.randn(2, C, 4, 4) * 2 + 1).requires_grad_()
    grad = torch.randn(2, C, 4, 4)
    module(x).backward(grad)  # updates the estimates from x, then normalizes with them
    assert not bn.running_mean.requires_grad and not bn.running_var.requires_grad
    # independent statement with the post-update estimates as constants; a gradient through the
    # estimates (they depend on x in this step) would add a term to x's gradient
    x64 = x.detach().double().requires_grad_()
    x1 = torch.nn.functional.batch_norm(
        x64, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(), eps=1e-5
    )
    x2 = torch.nn.functional.group_norm(x1, G, eps=1e-5).view(2, G, -1)
    y = (x2 * module.weight.double().view(1, G, 1) + module.bias.double().view(1, G, 1)).view_as(x64)
    y.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)  # the extra term: O(1) of x.grad


def test_update_rate_zero_keeps_loaded_statistics():
    inputs = [torch.randn(1, C, 4, 4) * 5 + 3 for _ in range(3)]
    for rate in (0.0, 0.3):
        module = randomized_bcn(estimate=True, rate=rate)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        for x in inputs:
            module(x)
        changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
        # the same inputs move the estimates at r = 0.3: r alone keeps them at r = 0
        assert changed == (set() if rate == 0 else {"batch_norm.running_mean", "batch_norm.running_var"})


@pytest.mark.parametrize("estimate", [True, False])
def test_state_dict_round_trip(estimate):
    module = randomized_bcn(estimate)
    module(torch.randn(2, C, 4, 4))
    keys = set(module.state_dict())
    assert {"weight", "bias", "batch_norm.running_mean", "batch_norm.running_var", "batch_norm.weight"} <= keys
    clone = BatchChannelNorm2d(C, num_groups=G, estimate=estimate, update_rate=0.3)
    clone.load_state_dict(module.state_dict())
    x = torch.randn(2, C, 4, 4)
    module.eval(), clone.eval()
    torch.testing.assert_close(module(x), clone(x), rtol=0, atol=0)


@pytest.mark.parametrize("estimate", [True, False])
def test_empty_batch_keeps_estimates(estimate):
    module = randomized_bcn(estimate)
    mean, var = module.batch_norm.running_mean.clone(), module.batch_norm.running_var.clone()
    out = module(torch.zeros(0, C, 4, 4))
    assert out.shape == (0, C, 4, 4)
    assert torch.equal(mean, module.batch_norm.running_mean) and torch.equal(var, module.batch_norm.running_var)


@pytest.mark.parametrize("estimate", [True, False])
def test_float64_training_matches_float64_reference(estimate):
    module = randomized_bcn(estimate).double()
    ref = ReferenceBCN(module, estimate, rate=0.3)
    for batch in (2, 1, 2):
        x = torch.randn(batch, C, 5, 6, dtype=torch.float64) * 3 + 1
        torch.testing.assert_close(module(x), ref(x, training=True), rtol=1e-10, atol=1e-10)
        assert module.batch_norm.running_mean.dtype == torch.float64
        torch.testing.assert_close(module.batch_norm.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimate", [True, False])
def test_bfloat16_in_bfloat16_out(estimate):
    module = randomized_bcn(estimate).to(torch.bfloat16)
    ref16 = ReferenceBCN(module, estimate, 0.3, torch.bfloat16)
    ref = ReferenceBCN(module, estimate, rate=0.3)  # float64, from the rounded parameters
    x = (torch.randn(2, C, 5, 6) * 3 + 1).to(torch.bfloat16)
    out = module(x)
    assert out.dtype == torch.bfloat16 and module.batch_norm.running_mean.dtype == torch.bfloat16
    helpers.assert_as_accurate(out, ref16(x, training=True).detach(), ref(x.double(), training=True), msg="output")
    helpers.assert_as_accurate(module.batch_norm.running_var, ref16.running_var, ref.running_var, msg="running_var")
    module.eval()
    assert module(x).dtype == torch.bfloat16


@pytest.mark.parametrize("estimate", [True, False])
def test_autocast_output_dtype_follows_group_norm(estimate):
    module = randomized_bcn(estimate)
    ref = ReferenceBCN(module, estimate, rate=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.conv2d(torch.randn(1, C, 6, 6), torch.randn(C, C, 3, 3))
        out = module(x)
        expected_dtype = torch.nn.functional.group_norm(x, G).dtype
    assert out.dtype == expected_dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref(x.double(), training=True), rtol=0.05, atol=0.05)
    assert module.batch_norm.running_var.dtype == torch.float32  # statistics in float32


def test_frozen_conversion_keeps_function_and_stops_updates():
    module = randomized_bcn(estimate=True).eval()
    x = torch.randn(2, C, 4, 4)
    expected, expected64 = module(x), copy.deepcopy(module).double()(x.double())
    FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    assert isinstance(module.batch_norm, FrozenBatchNorm2d)
    module.train()
    helpers.assert_as_accurate(module(x), expected, expected64)


def test_scripting_or_tracing_points_to_folding():
    module = randomized_bcn(estimate=True)
    with pytest.raises(RuntimeError, match="fold_for_inference"):
        torch.jit.script(module)
    with pytest.raises(RuntimeError, match="fold_for_inference"):
        torch.jit.trace(module.eval(), torch.randn(1, C, 4, 4))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="BCN num_groups 4 does not divide a layer's 10 channels"):
        BatchChannelNorm2d(10, num_groups=4)
    with pytest.raises(ValueError, match=r"BCN update_rate must be a finite number in \[0, 1\], got 1.5"):
        BatchChannelNorm2d(8, num_groups=4, update_rate=1.5)
    with pytest.raises(ValueError, match="BCN eps must be a finite number > 0, got inf"):
        BatchChannelNorm2d(8, num_groups=4, eps=float("inf"))
