"""Channel-first streams for conv nets, and module forms for nn.Sequential stacks."""

import pytest
import torch
from torch import nn

from hyperconn import ExpandStreams, HyperConnection, ReduceStreams, expand_streams, reduce_streams

VARIANTS = ("hc", "mhc", "isohc", "hybrid", "harmonized")


class Conv(nn.Module):
    """A channel-first branch: 3×3 conv on (B, C, H, W)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(x))


class ChannelsLast(nn.Module):
    """The same conv as a channel-last branch on (B, H, W, C)."""

    def __init__(self, conv: Conv):
        super().__init__()
        self.inner = conv

    def forward(self, x):
        return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_channel_first_equals_the_permuted_channel_last_layer(variant):
    torch.manual_seed(0)
    n, C = 4, 6
    first = HyperConnection(C, n, Conv(C), variant=variant, channel_first=True, alpha_init=0.3)
    last = HyperConnection(C, n, ChannelsLast(first.branch), variant=variant, alpha_init=0.3)
    last.load_state_dict({k.replace("branch.", "branch.inner."): v for k, v in first.state_dict().items()})
    x = torch.randn(2, n * C, 5, 7, requires_grad=True)           # (B, n·C, H, W)
    # Independent: the channel-last layer on the explicitly permuted streams.
    x_last = x.detach().unflatten(1, (n, C)).permute(0, 3, 4, 1, 2).requires_grad_()  # (B, H, W, n, C)
    out = first(x)
    want = last(x_last).permute(0, 3, 4, 1, 2).flatten(1, 2)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gl,) = torch.autograd.grad(want, x_last, g)
    torch.testing.assert_close(gx, gl.permute(0, 3, 4, 1, 2).flatten(1, 2), atol=1e-6, rtol=1e-5)
    # coefficients are per pixel
    h_pre, _, h_res = first.coefficients(first._to_last(x.detach()))
    assert h_pre.shape == (2, 5, 7, n) and h_res.shape == (2, 5, 7, n, n)


def test_channel_first_pre_post_by_hand_and_shape_errors():
    n, C = 2, 3
    layer = HyperConnection(C, n, None, variant="mhc", channel_first=True)
    x = expand_streams(torch.randn(2, C, 4, 4), n, channel_first=True)
    assert x.shape == (2, n * C, 4, 4) and torch.equal(x[:, :C], x[:, C:])
    inp, finish = layer.pre(x)
    assert inp.shape == (2, C, 4, 4)
    out = finish(inp * 2)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="^x: expected shape \\(B, streams·dim=6"):
        layer.pre(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="^streams:"):
        reduce_streams(x, channel_first=True)
    torch.testing.assert_close(reduce_streams(x, n, channel_first=True), x[:, :C])


def test_small_resnet_with_channel_first_streams_trains():
    torch.manual_seed(0)
    n, C = 4, 8
    net = nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        ExpandStreams(n, channel_first=True),
        *[HyperConnection(C, n, nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1)),
                          variant="mhc", layer_index=i, channel_first=True) for i in range(3)],
        ReduceStreams(n, channel_first=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 10))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_module_forms_in_a_sequential_transformer_stack():
    torch.manual_seed(0)
    n, C = 4, 16

    def mlp():
        return nn.Sequential(nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    stack = nn.Sequential(ExpandStreams(n), *[HyperConnection(C, n, mlp(), variant="isohc", layer_index=i)
                                              for i in range(4)], ReduceStreams())
    x = torch.randn(3, 7, C)
    out = stack(x)
    assert out.shape == x.shape
    manual = expand_streams(x, n)
    for layer in stack[1:-1]:
        manual = layer(manual)
    torch.testing.assert_close(out, reduce_streams(manual))
    assert "streams=4" in repr(stack[0])
    with pytest.raises(ValueError, match="^streams:"):
        ExpandStreams(0)
