"""chanaxis_fast scores drive Torch-Pruning's pruner: the slimmed model runs, its FLOPs equal our
masked count and it removes exactly the channels our plan masks."""

import copy

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import chanaxis_fast as cf
from chanaxis_fast.integrations.torch_pruning import Importance

tp = pytest.importorskip("torch_pruning")


@pytest.mark.parametrize("name,ratio", [("resnet18", 0.5), ("resnet18", 0.25), ("mobilenet_v2", 0.5)])
@pytest.mark.parametrize("metric", ["l1", "fpgm_removable"])
def test_importance_drives_torch_pruning_to_our_plan(name, ratio, metric):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = cf.trace_model(model, x)
    if metric == "fpgm_removable":  # a metric whose higher values mean removable
        cf.register_metric("fpgm_removable", direction=-1, replace=True)(
            lambda ctx, layer: -ctx.metric("fpgm", layer))
    try:
        scores = cf.score(model, graph=graph, metrics=[metric])
        p = cf.plan(model, scores, metric, ratio)
        slim = copy.deepcopy(model)
        head = slim.fc if name == "resnet18" else slim.classifier[1]
        pruner = tp.pruner.MetaPruner(slim, x[:1], importance=Importance(scores, metric),
                                      pruning_ratio=ratio, ignored_layers=[head])
        pruner.step()
    finally:
        from chanaxis_fast.metrics.registry import _REGISTRY
        _REGISTRY.pop("fpgm_removable", None)
    with torch.no_grad():
        assert slim(x).shape == (2, 10)
    with FlopCounterMode(display=False) as fcm, torch.no_grad():
        slim(x)
    assert fcm.get_total_flops() == 2 * p.flops_after
    # the channels Torch-Pruning removed are the ones the plan masks
    removed = {}
    for root, is_out, idxs in pruner.DG.pruning_history():
        if is_out:
            removed[root] = sorted(idxs)
    planned = {g.members[0]: g.pruned for g in p.groups if g.pruned}
    for root, idxs in removed.items():
        group = next(g for g in p.groups if root in g.members)
        assert idxs == group.pruned, root
    assert len(removed) == len(planned)
