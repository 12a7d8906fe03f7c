"""The Triton kernels of WS and BCN against the torch path they replace on CUDA.

On a machine without CUDA the kernels run on CPU tensors through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there) and the dispatch
is forced onto them; on a GPU they run compiled, through the normal dispatch.
Each result is compared with the torch path in float64, within a few times the
float32 torch path's own error (helpers.assert_as_accurate).
"""
import copy
import functools
import os

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import helpers
from wsbcn_d2.cuda import WSConvGroup, batch_channel_norm, bcn_kernels, dispatch, enable_fast_path, launcher, ws_group
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d
from wsbcn_d2.layers.bcn import group_norm_output_dtype

pytestmark = [pytest.mark.skipif(launcher.triton is None, reason="triton is not installed"), pytest.mark.numerics]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels(monkeypatch):
    """Route CPU tensors through the (interpreted) kernels; on CUDA they are the normal path."""
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "set by tests/conftest.py before triton is imported"
        monkeypatch.setattr(dispatch, "use_kernels", lambda x: x.dtype in dispatch.KERNEL_DTYPES)
    assert dispatch.use_kernels(torch.zeros(1, device=DEVICE))


def torch_path(monkeypatch):
    monkeypatch.setattr(dispatch, "use_kernels", lambda x: False)


# ---------------------------------------------------------------------------------------------- WS
def reference_standardize(weight: torch.Tensor, eps: float = 1e-5, form: str = "std+eps") -> torch.Tensor:
    """The source's own WS line of ``form`` in float64."""
    w = weight.double()
    return helpers.WS_SOURCE_LINES[form](w.view(*w.shape, *(1,) * (4 - w.dim())), eps).view_as(w)


WS_SHAPES = [(16, 8, 3, 3), (12, 4, 1, 1), (5, 3, 7, 7), (8, 2, 3, 3), (3, 700, 1, 1)]  # last: rows > BLOCK


def ws_convs(seed: int = 0, dtype=torch.float32, eps: float = 1e-5, form: str = "std+eps"):
    torch.manual_seed(seed)
    convs = [WSConv2d(i, o, k, bias=False, eps=eps, form=form).to(DEVICE, dtype) for o, i, k, _ in WS_SHAPES]
    with torch.no_grad():
        for conv in convs:  # uneven scales and a mean per filter
            offset = torch.randn(conv.weight.shape[0], 1, 1, 1, device=DEVICE)
            conv.weight.mul_(torch.rand_like(conv.weight) * 3).add_(offset)
    return convs


def standardize_and_backward(weight: torch.Tensor, grad: torch.Tensor, eps: float, form: str) -> tuple:
    """The source's own WS line of ``form`` in ``weight``'s dtype, and the weight gradient of ``<W_hat, grad>``."""
    weight = weight.detach().clone().requires_grad_()
    w_hat = helpers.WS_SOURCE_LINES[form](weight.view(*weight.shape, *(1,) * (4 - weight.dim())), eps)
    (w_hat.view_as(weight) * grad.to(weight.dtype)).sum().backward()
    return w_hat.view_as(weight).detach(), weight.grad


def check_group_against_formula(convs) -> None:
    """One group's standardized weights and weight gradients against the formula (float32 and float64)."""
    WSConvGroup(convs)
    weights = [conv.standardized_weight() for conv in convs]
    grads = [torch.randn_like(w) for w in weights]
    sum((w * g).sum() for w, g in zip(weights, grads)).backward()
    for conv, w, g in zip(convs, weights, grads):
        baseline = standardize_and_backward(conv.weight, g, conv.eps, conv.form)
        reference = standardize_and_backward(conv.weight.double(), g, conv.eps, conv.form)
        for name, got, base, ref in zip(("W_hat", "weight gradient"), (w, conv.weight.grad), baseline, reference):
            helpers.assert_as_accurate(got, base, ref, msg=f"{tuple(w.shape)} {name}")


FORM_CASES = [("std+eps", 1e-5), ("var+eps", 1e-5), ("biased_var+eps", 1e-8)]


@pytest.mark.parametrize("form, eps", FORM_CASES, ids=[f"{f}-{e:g}" for f, e in FORM_CASES])
@pytest.mark.parametrize("filters", ["uneven", "trained"])
def test_ws_group_matches_float64_formula(kernels, form, eps, filters):
    convs = ws_convs(eps=eps, form=form)
    if filters == "trained":  # per-filter stds in [1e-3, 5e-2], where the forms differ most
        generator = torch.Generator().manual_seed(2)
        for conv in convs:
            conv.weight.data = helpers.trained_ws_filters_(conv.weight.detach().cpu(), generator).to(DEVICE)
    check_group_against_formula(convs)


def test_ws_group_needs_one_form():
    convs = [WSConv2d(3, 4, 1, form="std+eps"), WSConv2d(3, 4, 1, form="var+eps")]
    with pytest.raises(ValueError, match="one WS form and eps for all its convs"):
        WSConvGroup(convs)


def test_ws_group_runs_one_kernel_per_pass(kernels, monkeypatch):
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(ws_group, f"ws_rows_{name}")

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(ws_group, f"ws_rows_{name}", counted)
    convs = ws_convs()
    WSConvGroup(convs)
    for _ in range(2):
        sum(conv.standardized_weight().sum() for conv in convs).backward()
    assert calls == {"forward": 2, "backward": 2}


def tiny_model(seed: int = 0) -> nn.Sequential:
    """Three WS convs carrying norms, standardized as one group (train it on :func:`loss`)."""
    torch.manual_seed(seed)
    layers = [WSConv2d(c_in, 8, 3, padding=1, bias=False, norm=nn.GroupNorm(2, 8)) for c_in in (3, 8, 8)]
    WSConvGroup(layers)
    return nn.Sequential(*layers).to(DEVICE)


def loss(output: torch.Tensor) -> torch.Tensor:
    """A loss of :func:`tiny_model`'s output whose gradients are not 0: the group norm's output has mean 0 and
    variance 1 per group whatever the weights, so ``output.square().mean()`` is constant and its gradients
    are rounding noise alone."""
    return output.cos().mean()


def training_run(model: nn.Module, schedule: str, steps: int = 2):
    """Run ``schedule`` (f = forward, b = backward of everything so far, s = SGD step, e = eval forward)."""
    torch.manual_seed(1)
    dtype = next(model.parameters()).dtype
    xs = [torch.randn(2, 3, 9, 7, device=DEVICE).to(dtype) for _ in range(schedule.count("f") + schedule.count("e"))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, outputs = [], []
    for op in schedule:
        if op == "f":
            losses.append(loss(model.train()(xs.pop())))
        elif op == "e":
            with torch.no_grad():
                outputs.append(model.eval()(xs.pop()))
        elif op == "b":
            sum(losses).backward()
            losses = []
        elif op == "s":
            opt.step()
            opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], outputs


# two forwards before one backward; backward after each forward (accumulation); eval between steps
@pytest.mark.parametrize("schedule", ["fbs", "ffbs", "fbfbs", "fbsefbse", "fbsfbsfbs"])
def test_ws_group_training_equals_per_conv_path(kernels, monkeypatch, schedule):
    params, outputs = training_run(tiny_model(), schedule)
    torch_path(monkeypatch)
    baseline = sum(training_run(tiny_model(), schedule), [])
    reference = sum(training_run(tiny_model().double(), schedule), [])  # the torch path: kernels take no float64
    for i, (p, b, r) in enumerate(zip(params + outputs, baseline, reference)):
        helpers.assert_as_accurate(p, b, r, msg=f"parameter or output {i}")


def count_nodes(output: torch.Tensor, name: str) -> int:
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(type(node).__name__ == name for node in seen)


def test_ws_group_under_autocast_equals_per_conv_path(kernels, monkeypatch):
    # the group emits autocast's dtype (one cast for all convs instead of a cast node per conv);
    # a forward without autocast before the backward gets float32 weights again
    def run(dtype=torch.float32, autocast=True):
        model = tiny_model().to(dtype)
        x = torch.randn(2, 3, 9, 7, device=DEVICE).to(dtype)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
            weight = model[1].standardized_weight()
            out = model(x)
        plain = model(x)
        (loss(out.to(dtype)) + loss(plain)).backward()
        return weight.dtype, count_nodes(out, "ToCopyBackward0"), [out, plain] + [p.grad for p in model.parameters()]

    dtype, casts, got = run()
    torch_path(monkeypatch)
    _, ref_casts, baseline = run()
    *_, reference = run(torch.float64, autocast=False)
    assert dtype == torch.bfloat16 and casts == ref_casts - 3
    for i, (a, b, r) in enumerate(zip(got, baseline, reference)):  # bf16 weights: rounding may differ by an ulp
        helpers.assert_as_accurate(a, b, r, msg=f"output or gradient {i}")


def test_ws_group_skips_frozen_convs(kernels):
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    before = [conv.weight.detach().clone() for conv in model]
    training_run(model, "fbs")
    assert model[0].weight.grad is None and torch.equal(model[0].weight, before[0])
    assert not torch.equal(model[1].weight, before[1]) and not torch.equal(model[2].weight, before[2])
    # the frozen conv uses its own cache, equal to the formula
    torch.testing.assert_close(model[0].standardized_weight().double(), reference_standardize(before[0]))


def test_ws_group_survives_deepcopy_and_device_free_state(kernels):
    model = tiny_model()
    model(torch.randn(1, 3, 5, 5, device=DEVICE)).sum()  # live result attached to an autograd graph
    copied = copy.deepcopy(model)
    assert copied[0].ws_group is copied[1].ws_group is not model[0].ws_group
    x = torch.randn(1, 3, 5, 5, device=DEVICE)
    torch.testing.assert_close(copied(x), model(x))


def test_ws_group_under_ddp(kernels, tmp_path):
    if DEVICE == "cuda":
        pytest.skip("single-process gloo DDP of a CPU model; the GPU check covers CUDA")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        x = torch.randn(2, 3, 6, 6)
        loss(ddp(x)).backward()
        baseline, reference = tiny_model(), tiny_model().double()
        loss(baseline(x)).backward()
        loss(reference(x.double())).backward()
        for p, b, r in zip(model.parameters(), baseline.parameters(), reference.parameters()):
            helpers.assert_as_accurate(p.grad, b.grad, r.grad, msg="weight gradient")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- BCN
def randomized_bcn(channels: int, groups: int, estimate: bool = True, rate: float = 0.3) -> BatchChannelNorm2d:
    return enable_fast_path(helpers.randomized_bcn(channels, groups, estimate, rate).to(DEVICE))


def bcn_state(module: BatchChannelNorm2d) -> dict:
    bn = module.batch_norm
    return {"running_mean": bn.running_mean, "running_var": bn.running_var}


def run_bcn(module: BatchChannelNorm2d, x: torch.Tensor, grad: torch.Tensor, forward=None):
    """Output, input gradient and the four parameter gradients of one forward/backward (of ``forward(x)``,
    by default ``module(x)``)."""
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = (forward or module)(x)
    out.backward(grad.to(out.dtype))
    params = [module.batch_norm.weight, module.batch_norm.bias, module.weight, module.bias]
    return [out, x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


# (N, C, H, W, G): micro batches, odd spatial sizes, 1x1 maps, 3 and 32 channels per group,
# and many samples (RoI heads), which the group kernels walk in chunks
BCN_SHAPES = [(1, 8, 5, 7, 4), (2, 12, 1, 1, 4), (2, 64, 9, 9, 2), (300, 16, 2, 3, 4)]


BCN_PATHS = {"fused": 1 << 20, "group_kernels": 0}
"""Values of bcn_kernels._FUSED_GROUP_TILE that force each path: fused kernels, or per-group kernels."""


@pytest.mark.parametrize("path", list(BCN_PATHS))
@pytest.mark.parametrize("shape", BCN_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["estimate", "estimate_eval", "frozen", "large_batch_eval"])
def test_bcn_kernels_match_float64_torch_path(kernels, monkeypatch, shape, mode, path):
    monkeypatch.setattr(bcn_kernels, "_FUSED_GROUP_TILE", BCN_PATHS[path])
    n, c, h, w, groups = shape
    module = randomized_bcn(c, groups, estimate=mode != "large_batch_eval")
    if mode == "frozen":
        FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    baseline, reference = copy.deepcopy(module), copy.deepcopy(module).double()
    for m in (module, baseline, reference):
        m.train(mode in ("estimate", "frozen"))
    for step in range(3):  # the estimates evolve over steps in "estimate"
        g = torch.Generator().manual_seed(step)
        x = (torch.randn(n, c, h, w, generator=g) * 3 + step).to(DEVICE)
        grad = torch.randn(n, c, h, w, generator=g).to(DEVICE)
        got = run_bcn(module, x, grad)
        with monkeypatch.context() as m:
            torch_path(m)
            expected32 = run_bcn(baseline, x, grad)
            expected = run_bcn(reference, x.double(), grad.double())
        for name, a, b, r in zip(BCN_GRADIENTS, got, expected32, expected):
            helpers.assert_as_accurate(a, b, r, msg=f"{name}, step {step}")
        assert_estimates_as_accurate(module, baseline, reference)


def assert_estimates_as_accurate(module: BatchChannelNorm2d, baseline: BatchChannelNorm2d, reference) -> None:
    """``module``'s BCN estimates against the float64 ``reference``'s, as close as the torch path's ``baseline``."""
    for key, value in bcn_state(module).items():
        helpers.assert_as_accurate(value, bcn_state(baseline)[key], bcn_state(reference)[key], msg=key)


BCN_GRADIENTS = ["output", "dx", "d_bn_weight", "d_bn_bias", "d_weight", "d_bias"]


def run_bcn_with_residual(module: BatchChannelNorm2d, x, z, grad, forward) -> list:
    """:func:`run_bcn` of ``forward(x, z)``, then the gradient of the residual ``z`` (None without one)."""
    z = None if z is None else z.detach().requires_grad_()
    results = run_bcn(module, x, grad, lambda x: forward(x, z))
    return results + [None if z is None else z.grad]


def gradient_off_the_kink(module: BatchChannelNorm2d, x, z, grad, monkeypatch, margin: float = 1e-3):
    """``grad`` zeroed where ``module(x) + z`` (float64 torch path, on a copy of the module) lies within
    ``margin`` of 0: there float32 and float64 may fall on either side of a ReLU's kink, so that one passes
    the gradient and the other does not."""
    with monkeypatch.context() as m, torch.no_grad():
        torch_path(m)
        before_relu = separate_forward(copy.deepcopy(module), relu=False)(x, z)
    return grad.masked_fill(before_relu.abs() < margin, 0)


def fused_forward(module: BatchChannelNorm2d, relu: bool):
    return lambda x, z: batch_channel_norm(module, x, z, relu)


def separate_forward(module: BatchChannelNorm2d, relu: bool):
    """BCN, then detectron2's ``out += shortcut`` and ``F.relu_``."""

    def forward(x, z):
        out = module(x)
        if z is not None:
            out += z
        return torch.relu_(out) if relu else out

    return forward


@pytest.mark.parametrize("path", list(BCN_PATHS))
@pytest.mark.parametrize("shape", BCN_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ops", ["relu", "residual", "residual, relu"])
def test_bcn_fused_residual_and_relu_match_float64_torch_path(kernels, monkeypatch, shape, training, path, ops):
    monkeypatch.setattr(bcn_kernels, "_FUSED_GROUP_TILE", BCN_PATHS[path])
    n, c, h, w, groups = shape
    relu, residual = "relu" in ops, "residual" in ops
    module = randomized_bcn(c, groups).train(training)
    baseline, reference = copy.deepcopy(module), copy.deepcopy(module).double()
    fused_torch_path = copy.deepcopy(module).double()
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x = (torch.randn(n, c, h, w, generator=g) * 3 + step).to(DEVICE)
        grad = torch.randn(n, c, h, w, generator=g).to(DEVICE)
        z = torch.randn(n, c, h, w, generator=g).to(DEVICE) if residual else None
        z64 = None if z is None else z.double()
        got = run_bcn_with_residual(module, x, z, grad, fused_forward(module, relu))
        with monkeypatch.context() as m:
            torch_path(m)
            expected32 = run_bcn_with_residual(baseline, x, z, grad, separate_forward(baseline, relu))
            expected = run_bcn_with_residual(
                reference, x.double(), z64, grad.double(), separate_forward(reference, relu)
            )
            fused_torch = run_bcn_with_residual(
                fused_torch_path, x.double(), z64, grad.double(), fused_forward(fused_torch_path, relu)
            )
        if relu:
            assert 0 < (got[0] == 0).float().mean() < 1  # the ReLU clips a part of the output
        for name, a, b32, b, t in zip(BCN_GRADIENTS + ["d_residual"], got, expected32, expected, fused_torch):
            if b is None:
                assert a is None and b32 is None and t is None
                continue
            helpers.assert_as_accurate(a, b32, b, msg=f"{name}, step {step}")
            torch.testing.assert_close(t, b, msg=lambda s: f"torch path, {name}, step {step}: {s}")
        assert_estimates_as_accurate(module, baseline, reference)
    if not training:  # the inference path (no autograd function) too
        with torch.no_grad():
            torch.testing.assert_close(batch_channel_norm(module, x, z, relu), got[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bcn_fused_relu_equals_relu_after_the_kernels(kernels, monkeypatch, dtype):
    # the fused ReLU's mask is taken from the output as stored (rounded to its dtype), as torch.relu's backward
    for path in BCN_PATHS.values():
        monkeypatch.setattr(bcn_kernels, "_FUSED_GROUP_TILE", path)
        fused, separate = randomized_bcn(16, 4), randomized_bcn(16, 4)
        x = torch.randn(2, 16, 6, 5, device=DEVICE).to(dtype)
        grad = torch.randn(2, 16, 6, 5, device=DEVICE).to(dtype)
        got = run_bcn(fused, x, grad, lambda x: batch_channel_norm(fused, x, relu=True))
        expected = run_bcn(separate, x, grad, lambda x: torch.relu(separate(x)))
        for name, a, b in zip(BCN_GRADIENTS, got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bcn_fused_residual_relu_gradients_follow_the_stored_output(kernels, monkeypatch, dtype):
    # relu(BCN(x) + z) is rounded once (the sum in float32); its gradient: dz = dy where the stored output
    # is > 0, and BCN's gradients are those of BCN alone given that dz
    for path in BCN_PATHS.values():
        monkeypatch.setattr(bcn_kernels, "_FUSED_GROUP_TILE", path)
        fused, separate = randomized_bcn(16, 4), randomized_bcn(16, 4)
        x, z, grad = (torch.randn(2, 16, 6, 5, device=DEVICE).to(dtype) for _ in range(3))
        *got, d_residual = run_bcn_with_residual(fused, x, z, grad, fused_forward(fused, relu=True))
        masked_grad = torch.where(got[0] > 0, grad, 0)
        expected = run_bcn(separate, x, masked_grad)
        assert got[0].dtype == d_residual.dtype == dtype and 0 < (got[0] == 0).float().mean() < 1
        assert torch.equal(d_residual, masked_grad)
        eps = torch.finfo(dtype).eps  # the fused sum is rounded once, the separate one twice
        sum_after = torch.relu(expected[0].float() + z.float()).to(dtype)
        torch.testing.assert_close(got[0], sum_after, rtol=eps, atol=4 * eps)
        for name, a, b in list(zip(BCN_GRADIENTS, got, expected))[1:]:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda s: f"{name}: {s}")
        for key, value in bcn_state(fused).items():
            assert torch.equal(value, bcn_state(separate)[key])


def test_bcn_residual_of_another_dtype(kernels, monkeypatch):
    # added in float32 to the output, which keeps x's dtype; the residual's gradient comes back in its dtype
    x = torch.randn(2, 16, 6, 5, device=DEVICE)
    z = torch.randn(2, 16, 6, 5, device=DEVICE).to(torch.bfloat16)
    grad = torch.randn(2, 16, 6, 5, device=DEVICE)
    module = randomized_bcn(16, 4)
    baseline, reference = copy.deepcopy(module), copy.deepcopy(module).double()
    got = run_bcn_with_residual(module, x, z, grad, fused_forward(module, relu=True))
    torch_path(monkeypatch)
    expected32 = run_bcn_with_residual(baseline, x, z, grad, separate_forward(baseline, relu=True))
    expected = run_bcn_with_residual(reference, x.double(), z.double(), grad.double(), separate_forward(reference, True))
    assert got[0].dtype == torch.float32 and got[-1].dtype == torch.bfloat16
    for name, a, b32, b in zip(BCN_GRADIENTS + ["d_residual"], got, expected32, expected):
        helpers.assert_as_accurate(a, b32, b, msg=name)


def test_bcn_residual_of_another_shape_is_an_error(kernels):
    module = randomized_bcn(8, 4)
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(2, 8, 4, 4\), got \(1, 8, 1, 1\)"):
        batch_channel_norm(module, x, torch.randn(1, 8, 1, 1, device=DEVICE), relu=True)


@pytest.mark.parametrize("block_end", [False, True], ids=["bcn", "bcn_shortcut_relu"])
@pytest.mark.parametrize("n, launches", [(2, (2, 2)), (300, (3, 3))])
def test_bcn_launches_per_pass(kernels, monkeypatch, n, launches, block_end):
    # micro-batches: moments + fused forward, sums + fused backward; RoI heads: per-group kernels between;
    # the same with a residual added and a ReLU (a ResNet block's end)
    counts = {"forward": 0, "backward": 0}
    for name in [k for k in vars(bcn_kernels) if k.startswith("_bcn_") and k.endswith("_kernel")]:
        kernel = getattr(bcn_kernels, name)

        class Counted:
            fn = kernel.fn

            def __getitem__(self, grid, _kernel=kernel):
                counts["backward" if backward_started else "forward"] += 1
                return _kernel[grid]

        monkeypatch.setattr(bcn_kernels, name, Counted())
    module = randomized_bcn(16, 4)
    backward_started = False
    x, z = (torch.randn(n, 16, 3, 3, device=DEVICE, requires_grad=True) for _ in range(2))
    out = batch_channel_norm(module, x, z, relu=True) if block_end else module(x)
    backward_started = True
    out.sum().backward()
    assert (counts["forward"], counts["backward"]) == launches
    assert (z.grad is not None) == block_end


@pytest.mark.parametrize("why", ["no_grad", "frozen_parameters"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bcn_kernels_without_gradients_match_torch_path(kernels, monkeypatch, training, why):
    # with nothing to differentiate the kernels run without the autograd function:
    # same output, same estimate update
    module = randomized_bcn(16, 4).train(training)
    baseline, reference = copy.deepcopy(module), copy.deepcopy(module).double()
    initial_mean = module.batch_norm.running_mean.clone()
    if why == "frozen_parameters":
        module.requires_grad_(False)
    for step in range(2):
        x = torch.randn(2, 16, 5, 3, device=DEVICE) * 2 + step
        with torch.set_grad_enabled(why != "no_grad"):
            out = module(x)
        with torch.no_grad(), monkeypatch.context() as m:
            torch_path(m)
            expected32, expected = baseline(x), reference(x.double())
        assert out.grad_fn is None
        helpers.assert_as_accurate(out, expected32, expected, msg=f"output, step {step}")
        assert_estimates_as_accurate(module, baseline, reference)
    assert torch.equal(module.batch_norm.running_mean, initial_mean) != training  # updated in training only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bcn_kernels_half_inputs(kernels, monkeypatch, dtype):
    module = randomized_bcn(16, 4)
    baseline, baseline32, reference = copy.deepcopy(module), copy.deepcopy(module), copy.deepcopy(module).double()
    x = torch.randn(2, 16, 6, 5, device=DEVICE).to(dtype)
    grad = torch.randn(2, 16, 6, 5, device=DEVICE).to(dtype)
    got = run_bcn(module, x, grad)
    torch_path(monkeypatch)
    expected_half = run_bcn(baseline, x, grad)
    run_bcn(baseline32, x.float(), grad.float())
    expected = run_bcn(reference, x.double(), grad.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype  # output and dx follow the input, as group norm's
    for name, a, b_half, b in zip(BCN_GRADIENTS, got, expected_half, expected):
        helpers.assert_as_accurate(a, b_half, b, msg=name)
    # statistics in float32: estimates as the float32 torch path's from the rounded input
    assert all(value.dtype == torch.float32 for value in bcn_state(module).values())
    assert_estimates_as_accurate(module, baseline32, reference)


def test_bcn_kernels_empty_batch_keeps_estimates(kernels):
    module = randomized_bcn(8, 4)
    before = {k: v.clone() for k, v in bcn_state(module).items()}
    out = module(torch.zeros(0, 8, 4, 4, device=DEVICE))
    assert out.shape == (0, 8, 4, 4)
    for key, value in bcn_state(module).items():
        assert torch.equal(value, before[key])


def test_bcn_output_dtype_follows_group_norm_under_autocast(kernels):
    module = randomized_bcn(8, 4)
    device_type = torch.device(DEVICE).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        x = nn.functional.conv2d(torch.randn(1, 8, 6, 6, device=DEVICE), torch.randn(8, 8, 3, 3, device=DEVICE))
        out = module(x)
        gn = nn.functional.group_norm(x, 4)
        expected = group_norm_output_dtype(x)  # under the same autocast (float32 for group norm on CUDA)
    assert out.dtype == gn.dtype == expected
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("path", ["kernels", "torch"])
def test_bcn_is_once_differentiable(kernels, monkeypatch, path):
    if path == "torch":
        torch_path(monkeypatch)
    module = randomized_bcn(8, 4).eval()  # no estimate update: both calls compute the same function
    x = torch.randn(2, 8, 4, 4, device=DEVICE, requires_grad=True)
    (dx,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(module(x).square().sum(), x)
    torch.testing.assert_close(dx, expected)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


# ----------------------------------------------------------------------------------- direct launch
class FakeKernel:
    """A jit kernel's launch interface: ``kernel[grid](*args, **meta)`` returns the compiled kernel."""

    def __init__(self, names, constexprs):
        self.fn = lambda: None  # the jit function's Python function
        self.params = [type("Param", (), dict(name=n, is_constexpr=n in constexprs)) for n in names]
        self.jit_launches, self.direct_launches = [], []
        kernel = self

        class Compiled:
            packed_metadata, function = "packed", "function"

            def run(self, *run_args):
                kernel.direct_launches.append(run_args)

            def launch_metadata(self, grid, stream, *args):
                return "launch_metadata"

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.jit_launches.append((grid, args, meta))
            return self.compiled

        return launch


def test_launch_reuses_the_compiled_kernel_per_key(monkeypatch):
    monkeypatch.setattr(launcher, "_COMPILED", {})
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH", True)
    monkeypatch.setattr(launcher, "_stream_getter", lambda: lambda device: ("stream", device))
    kernel = FakeKernel(["x", "n", "A", "B"], constexprs={"A", "B"})
    x = torch.zeros(3)
    launch = functools.partial(launcher.launch, kernel)
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), "key")
    assert len(kernel.jit_launches) == 1 and not kernel.direct_launches
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), "key")
    assert len(kernel.jit_launches) == 1
    (run_args,) = kernel.direct_launches
    # no launch hooks set: no launch metadata, None for the hooks
    assert run_args[:9] == (4, 1, 1, ("stream", -1), "function", "packed", None, None, None)
    assert run_args[9] is x and run_args[10:] == (5, 64, True)  # after the two hooks: args, then constexprs
    # a profiler's hook: the launch metadata and Triton's hooks go to the launcher
    with monkeypatch.context() as m:
        hooks = launcher.triton.knobs.runtime
        def hook(metadata):
            pass

        enter_hook = hook  # a plain callable before Triton's hook chains, else a chain holding it
        if hasattr(hooks.launch_enter_hook, "add"):
            enter_hook = type(hooks.launch_enter_hook)()
            enter_hook.add(hook)
        m.setattr(hooks, "launch_enter_hook", enter_hook)
        launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), "key")
        assert kernel.direct_launches.pop()[6:9] == ("launch_metadata", hooks.launch_enter_hook, hooks.launch_exit_hook)
    launch((4,), (x, 5), dict(A=128, B=True, num_warps=4), "key")  # other constexprs: Triton's launch
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), "other key")
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), None)  # no key: always Triton's launch
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), None)
    assert len(kernel.jit_launches) == 5 and len(kernel.direct_launches) == 1
    monkeypatch.setattr(launcher, "_MAX_COMPILED", 3)  # full: starts over
    assert len(launcher._COMPILED) == 3
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), "fourth key")
    assert len(launcher._COMPILED) == 1
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), "fourth key")
    assert len(kernel.jit_launches) == 6 and len(kernel.direct_launches) == 2
    # a launcher that refuses the arguments (another Triton): Triton's launch, no direct launches from then on
    def refuse(*run_args):
        raise TypeError("launcher signature")

    monkeypatch.setattr(kernel.compiled, "run", refuse)
    launch((4,), (x, 5), dict(A=64, B=True, num_warps=4), "fourth key")
    assert len(kernel.jit_launches) == 7 and not launcher._DIRECT_LAUNCH and not launcher._COMPILED
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH", True)
    # constexprs before a positional argument: the argument order is unknown, never launched directly
    odd = FakeKernel(["x", "A", "n"], constexprs={"A"})
    for _ in range(2):
        launcher.launch(odd, (1,), (x, 5), dict(A=2), "key")
    assert len(odd.jit_launches) == 2 and not odd.direct_launches


# ---------------------------------------------------------------------------------------------- GPU
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="full-size shapes: compiled kernels on a GPU (make gpu-check)")


@cuda_only
def test_ws_direct_launches_equal_triton_launches(monkeypatch):
    def standardize_and_backward():
        convs = ws_convs()
        WSConvGroup(convs)
        weights = [conv.standardized_weight() for conv in convs]
        sum((w * w.detach().cos()).sum() for w in weights).backward()
        return [w.detach() for w in weights] + [conv.weight.grad for conv in convs]

    monkeypatch.setattr(launcher, "_COMPILED", {})
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH", False)
    expected = standardize_and_backward()
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH", True)
    standardize_and_backward()
    assert len(launcher._COMPILED) == 2  # forward, backward
    for got, want in zip(standardize_and_backward(), expected):
        assert torch.equal(got, want)


@cuda_only
def test_bcn_direct_launches_equal_triton_launches(monkeypatch):
    # eval mode with trainable parameters: no estimate update, so every call computes the same
    module = randomized_bcn(64, 8).eval()
    x = torch.randn(2, 64, 9, 11, device=DEVICE, requires_grad=True)
    grad = torch.randn_like(x)
    monkeypatch.setattr(launcher, "_COMPILED", {})
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH", False)
    expected = run_bcn(module, x, grad)
    assert not launcher._COMPILED
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH", True)
    run_bcn(module, x, grad)  # compiles or finds each kernel through Triton, keeps it
    assert len(launcher._COMPILED) == 4  # moments + fused forward, sums + fused backward
    for got, want in zip(run_bcn(module, x, grad), expected):
        assert torch.equal(got, want)


@cuda_only
def test_ws_group_full_size_resnet_weights():
    shapes = [(64, 3, 7, 7), (256, 64, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1), (256, 256, 3, 3), (512, 4608, 1, 1)]
    torch.manual_seed(0)
    check_group_against_formula([WSConv2d(i, o, k, bias=False).to(DEVICE) for o, i, k, _ in shapes])


# a res2 map of an 800x1067 image pair, a res5 map, and the box head's 7x7 maps of 1024 RoIs
@cuda_only
@pytest.mark.parametrize("shape", [(2, 256, 200, 267, 32), (2, 2048, 25, 34, 32), (1024, 256, 7, 7, 32)], ids=str)
@pytest.mark.parametrize("ops", ["bcn", "relu", "residual, relu"])
def test_bcn_kernels_full_size(monkeypatch, shape, ops):
    n, c, h, w, groups = shape
    relu = "relu" in ops
    module = randomized_bcn(c, groups)
    baseline, reference = copy.deepcopy(module), copy.deepcopy(module).double()
    x = torch.randn(n, c, h, w, device=DEVICE) * 2 + 0.5
    grad = torch.randn(n, c, h, w, device=DEVICE)
    z = torch.randn(n, c, h, w, device=DEVICE) if "residual" in ops else None
    z64 = None if z is None else z.double()
    if relu:  # millions of outputs: some lie within float32's rounding of the ReLU's kink
        grad = gradient_off_the_kink(reference, x.double(), z64, grad, monkeypatch)
    got = run_bcn_with_residual(module, x, z, grad, fused_forward(module, relu))
    with monkeypatch.context() as m:
        torch_path(m)
        expected32 = run_bcn_with_residual(baseline, x, z, grad, separate_forward(baseline, relu))
        expected = run_bcn_with_residual(reference, x.double(), z64, grad.double(), separate_forward(reference, relu))
    for name, a, b32, b in zip(BCN_GRADIENTS + ["d_residual"], got, expected32, expected):
        if b is None:
            assert a is None
            continue
        helpers.assert_as_accurate(a, b32, b, msg=name)
    assert_estimates_as_accurate(module, baseline, reference)
