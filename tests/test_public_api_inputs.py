"""Property test of the public API over dtypes, shapes and values.

Every call either returns a correct-shaped result — finite whenever the input is finite —
or raises ``TypeError`` / ``ValueError`` whose message starts with the argument's name.
Non-finite input is documented to propagate (no check: a check would cost a device sync
per layer); what is tested for it is that it stays inside the tokens it touches.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from hyperconn import HyperConnection, expand_streams, iso_project, reduce_streams, sinkhorn

DTYPES = [torch.int64, torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64]
# A "huge" value each float dtype can still carry through one layer without overflow.
HUGE = {torch.float16: 1e3, torch.bfloat16: 1e25, torch.float32: 1e25, torch.float64: 1e200}
VARIANTS = ("residual", "hc", "mhc", "isohc", "hybrid", "harmonized")
SETTINGS = settings(max_examples=80, deadline=None)


def make_input(shape, dtype, values, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if values == "huge" and dtype in HUGE:
        x = x * HUGE[dtype]
    x = x.to(dtype) if dtype.is_floating_point else (x > 0).to(dtype) if dtype == torch.bool else x.round().to(dtype)
    if values in ("nan", "inf") and dtype.is_floating_point and x.numel():
        x.view(-1)[0] = float("nan") if values == "nan" else float("inf")
    return x


def expect_named_error(exc, names):
    assert isinstance(exc, (TypeError, ValueError)), repr(exc)
    assert any(str(exc).startswith(n + ":") for n in names), str(exc)


@SETTINGS
@given(variant=st.sampled_from(VARIANTS), dtype=st.sampled_from(DTYPES),
       lead=st.sampled_from([(), (0,), (3,), (2, 0), (2, 3)]),
       bad_shape=st.sampled_from([None, "n", "C", "flat"]),
       values=st.sampled_from(["normal", "huge", "nan", "inf"]), seed=st.integers(0, 2**16))
def test_layer_returns_a_correct_result_or_a_named_error(variant, dtype, lead, bad_shape, values, seed):
    n = 1 if variant == "residual" else 4
    C = 8
    layer_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    branch_dtype = dtype if dtype.is_floating_point else torch.float32
    torch.manual_seed(seed)
    layer = HyperConnection(C, n, nn.Linear(C, C), variant=variant, alpha_init=0.3).to(layer_dtype)
    layer.branch.to(branch_dtype)  # the user's branch runs in the stream dtype
    shape = {None: lead + (n, C), "n": lead + (n + 1, C), "C": lead + (n, C + 1), "flat": (C,)}[bad_shape]
    x = make_input(shape, dtype, values, seed)
    try:
        out = layer(x)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        expect_named_error(e, ["x"])
        assert bad_shape is not None or not dtype.is_floating_point
        return
    assert bad_shape is None and dtype.is_floating_point
    assert out.shape == x.shape and out.dtype == x.dtype
    if values in ("normal", "huge"):
        assert torch.isfinite(out).all()
    elif x.dim() >= 3 and x.shape[0] > 1 and x.numel():
        # the bad value sits in token 0: the other tokens are untouched
        assert torch.isfinite(out.reshape(-1, n, C)[1:]).all()


@SETTINGS
@given(fn=st.sampled_from(["sinkhorn", "sinkhorn-implicit", "iso", "iso-polar", "iso-cubic"]),
       dtype=st.sampled_from(DTYPES), n=st.integers(0, 6), square=st.booleans(),
       lead=st.sampled_from([(), (0,), (3,), (2, 3)]),
       values=st.sampled_from(["normal", "huge", "nan"]), seed=st.integers(0, 2**16))
def test_projections_return_a_correct_result_or_a_named_error(fn, dtype, n, square, lead, values, seed):
    shape = lead + (n, n if square else n + 1)
    x = make_input(shape, dtype, values, seed)
    call = {"sinkhorn": lambda t: sinkhorn(t), "sinkhorn-implicit": lambda t: sinkhorn(t, backward="implicit"),
            "iso": lambda t: iso_project(t), "iso-polar": lambda t: iso_project(t, "polar"),
            "iso-cubic": lambda t: iso_project(t, "ns-cubic")}[fn]
    try:
        out = call(x)
    except Exception as e:  # noqa: BLE001
        expect_named_error(e, ["logits", "raw"])
        assert not square or not dtype.is_floating_point or n == 0
        return
    assert square and dtype.is_floating_point and n >= 1
    assert out.shape == x.shape and out.dtype == x.dtype
    if values != "nan":
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_expand_and_reduce_refuse_integer_streams(dtype):
    with pytest.raises(TypeError, match="^x:"):
        expand_streams(torch.ones(2, 3, dtype=dtype), 4)
    with pytest.raises(TypeError, match="^x:"):
        reduce_streams(torch.ones(2, 4, 3, dtype=dtype))
    with pytest.raises(ValueError, match="^streams:"):
        expand_streams(torch.ones(2, 3), 0)


def test_branch_returning_a_tuple_hands_the_extras_back():
    class WithExtras(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, h, scale=1.0):
            return self.lin(h) * scale, {"cache": "kv"}, 7

    layer = HyperConnection(8, 4, WithExtras(), variant="mhc")
    x = expand_streams(torch.randn(5, 8), 4)
    streams, extra, seven = layer(x, scale=2.0)
    assert streams.shape == x.shape and extra == {"cache": "kv"} and seven == 7
    # the first element is the branch output, exactly as a plain tensor branch gives
    plain = HyperConnection(8, 4, nn.Identity(), variant="mhc")
    plain.load_state_dict(layer.state_dict(), strict=False)
    inp, finish = layer.pre(x)
    torch.testing.assert_close(streams, finish(layer.branch.lin(inp) * 2.0))
    recompute = HyperConnection(8, 4, WithExtras(), variant="mhc", recompute=True)
    recompute.load_state_dict(layer.state_dict())
    out, _, _ = recompute(x.requires_grad_(), scale=2.0)
    out.sum().backward()
    assert x.grad is not None


def test_branch_returning_something_else_fails_clearly():
    class ReturnsDict(nn.Module):  # a mis-wrapped module
        def forward(self, h):
            return {"hidden": h}

    layer = HyperConnection(8, 4, ReturnsDict(), variant="mhc")
    with pytest.raises(ValueError, match="^y: expected the branch output as a tensor"):
        layer(expand_streams(torch.randn(2, 8), 4))
