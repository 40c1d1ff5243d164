"""trace_model: layers, read-out points and channel spaces against the known architectures."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from chanaxis_fast.graph import trace_model


def resnet18_cifar(num_classes=10):
    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def test_resnet18_structure():
    g = trace_model(resnet18_cifar(), torch.randn(2, 3, 32, 32))
    convs = [n for n, m in resnet18_cifar().named_modules() if isinstance(m, nn.Conv2d)]
    assert g.default_layers() == convs  # 20 convs, in execution order
    assert len(convs) == 20 and g.layers["fc"].is_output and g.layers["fc"].kind == "linear"
    for n in convs:
        assert g.layers[n].bn == n.replace("conv", "bn").replace("downsample.0", "downsample.1")
    # BasicBlock reuses self.relu: conv1's activation is its first call, conv2's the second
    assert (g.layers["layer3.1.conv1"].act, g.layers["layer3.1.conv1"].act_call) == ("layer3.1.relu", 0)
    assert (g.layers["layer3.1.conv2"].act, g.layers["layer3.1.conv2"].act_call) == ("layer3.1.relu", 1)
    assert g.layers["layer2.0.downsample.0"].act is None
    # residual coupling: the stem and every block output of stage 1 share channels
    assert g.coupled("layer1.1.conv2") == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert g.coupled("layer2.0.conv2") == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert g.coupled("layer2.0.conv1") == ["layer2.0.conv1"]
    assert sorted(c for c, _, _ in g.consumers("layer1.0.conv1")) == ["layer1.0.conv2"]
    assert sorted(c for c, _, _ in g.consumers("conv1")) == [
        "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]
    assert sorted(p for p, _ in g.producers("layer3.0.conv1")) == [
        "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert g.layers["layer4.1.conv2"].output_shape == (512, 4, 4)
    assert not any(g.is_opaque(n) for n in g.layers)


def test_mobilenet_v2_depthwise_and_inverted_residuals():
    g = trace_model(torchvision.models.mobilenet_v2(num_classes=10), torch.randn(2, 3, 32, 32))
    dw = g.layers["features.2.conv.1.0"]
    assert dw.depthwise and dw.groups == 96
    assert g.coupled("features.2.conv.0.0") == ["features.2.conv.0.0", "features.2.conv.1.0"]
    # blocks 2 and 3 are joined by a residual add (24 channels, stride 1)
    assert g.coupled("features.2.conv.2") == ["features.2.conv.2", "features.3.conv.2"]
    assert g.layers["features.2.conv.2"].act is None  # linear bottleneck
    assert g.layers["features.2.conv.0.0"].act == "features.2.conv.0.2"


def test_flatten_linear_and_concat():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(10, 5, 3, padding=1)
            self.fc = nn.Linear(5 * 4 * 4, 7)

        def forward(self, x):
            if x.shape[-1] != 8:  # Python control flow on shapes is fine for an eager tracer
                raise ValueError("8x8 only")
            y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
            y = F.max_pool2d(self.c(y), 2)
            return self.fc(torch.flatten(y, 1))

    g = trace_model(Net(), torch.randn(2, 3, 8, 8))
    assert g.producers("c") == [("a", 0), ("b", 4)]
    assert g.consumers("b") == [("c", 4, 1)]
    assert g.consumers("c") == [("fc", 0, 16)]
    assert g.layers["fc"].input_expand == 16 and g.layers["fc"].is_output
    assert g.layers["a"].act is None  # functional relu: no module to read from
    assert g.default_layers() == ["a", "b", "c"]


def test_unknown_channel_op_is_marked_opaque():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x)
            y = y.view(2, 2, 4, 8, 8).transpose(1, 2).reshape(2, 8, 8, 8)  # channel shuffle
            return self.b(y).mean((2, 3))

    g = trace_model(Shuffle(), torch.randn(2, 3, 8, 8))
    assert g.is_opaque("a")
    assert g.layers["b"].input_space is None and g.producers("b") == []


def test_shared_layer_and_bad_model_are_errors():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.a(self.a(x))

    with pytest.raises(ValueError, match="'a' is called more than once"):
        trace_model(Twice(), torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        trace_model(lambda x: x, torch.randn(1))


def test_trace_restores_training_mode():
    m = resnet18_cifar().train()
    trace_model(m, torch.randn(2, 3, 32, 32))
    assert m.training and m.layer1[0].bn1.training
