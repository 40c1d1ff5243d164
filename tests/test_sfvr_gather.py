"""The SFVR patch gather (chanaxis_fast.extras.sfvr.input_stats) against F.unfold: every conv
geometry (stride, dilation, zero / reflect / "same" padding, groups), sampled positions and every
position, float32 / bfloat16 inputs, and the non-finite paths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanaxis_fast.extras import sfvr
from chanaxis_fast.graph import trace_model


def unfold_stats(x, conv, positions):
    """float64 (count, mean [C, k2], comoment [C, k2, k2]) of each input channel's patches at the
    given flat output positions (None: all), from F.unfold of the padded input."""
    xp = sfvr.conv_pad(x.double(), conv)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [N, C k2, L]
    N, _, L = cols.shape
    C, k2 = x.shape[1], conv.kernel_size[0] * conv.kernel_size[1]
    cols = cols.view(N, C, k2, L)
    if positions is not None:
        cols = torch.stack([cols[i][:, :, positions[i]] for i in range(N)])  # [N, C, k2, n]
    rows = cols.permute(1, 0, 3, 2).reshape(C, -1, k2)  # [C, rows, k2]
    mean = rows.mean(1)
    z = rows - mean[:, None]
    return rows.shape[1], mean, z.transpose(1, 2) @ z


CONVS = {
    "3x3 pad 1": lambda: nn.Conv2d(6, 4, 3, padding=1),
    "3x3 stride 2 pad 1": lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1),
    "3x3 dilation 2 pad 2": lambda: nn.Conv2d(6, 4, 3, padding=2, dilation=2),
    "5x3 pad (2, 0) stride (1, 2)": lambda: nn.Conv2d(6, 4, (5, 3), padding=(2, 0), stride=(1, 2)),
    "3x3 no pad": lambda: nn.Conv2d(6, 4, 3),
    "3x3 reflect": lambda: nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"),
    "3x3 same": lambda: nn.Conv2d(6, 4, 3, padding="same"),
    "depthwise 3x3 pad 1": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    "1x1": lambda: nn.Conv2d(6, 4, 1),
}


@pytest.mark.parametrize("mode", ["sample", "all"])
@pytest.mark.parametrize("name", list(CONVS))
def test_patch_stats_equal_unfold(name, mode):
    torch.manual_seed(0)
    conv = CONVS[name]()
    net = nn.Sequential(conv)
    x = torch.randn(5, 6, 9, 8) * 3 + 1
    node = trace_model(net, x[:2]).layers["0"]
    Ho, Wo = conv(x).shape[2:]
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, Ho * Wo, (5, 7), generator=g) if mode == "sample" else None

    def index(N, S, device):
        assert S == Ho * Wo
        return pos if pos is not None else torch.arange(S).expand(N, S)

    got = sfvr.input_stats(x, conv, node, index, skip_nonfinite=False, who="t")
    n, mean, M = unfold_stats(x, conv, pos)
    assert got.count.tolist() == [n] * 6
    torch.testing.assert_close(got.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.comoment, M, rtol=1e-10, atol=1e-10)


def test_low_precision_input_is_read_exactly():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(4, 3, 6, 6).bfloat16()
    node = trace_model(nn.Sequential(conv), x[:2].float()).layers["0"]
    index = lambda N, S, device: torch.arange(S).expand(N, S)
    got = sfvr.input_stats(x, conv, node, index, skip_nonfinite=False, who="t")
    n, mean, M = unfold_stats(x.double(), conv, None)
    torch.testing.assert_close(got.comoment, M, rtol=1e-12, atol=1e-10)


def test_nonfinite_input_raises_or_drops_its_patches():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(3, 2, 5, 5)
    x[1, 0, 2, 2] = float("nan")
    node = trace_model(nn.Sequential(conv), torch.randn(2, 2, 5, 5)).layers["0"]
    index = lambda N, S, device: torch.arange(S).expand(N, S)
    with pytest.raises(ValueError, match="NaN/Inf"):
        sfvr.input_stats(x, conv, node, index, skip_nonfinite=False, who="t")
    got = sfvr.input_stats(x, conv, node, index, skip_nonfinite=True, who="t")
    # the NaN sits in the 3x3 patches of 9 output positions of image 1, channel 0 only
    assert got.count.tolist() == [3 * 25 - 9, 3 * 25]
    keep = torch.ones(3, 25, dtype=torch.bool)
    for h in (1, 2, 3):
        for w in (1, 2, 3):
            keep[1, h * 5 + w] = False
    cols = F.unfold(x.double(), 3, padding=1).view(3, 2, 9, 25)[:, 0]  # channel 0: [3, 9, 25]
    rows = cols.permute(0, 2, 1)[keep]                                 # [66, 9]
    z = rows - rows.mean(0)
    torch.testing.assert_close(got.comoment[0], z.T @ z, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(got.comoment).all()
