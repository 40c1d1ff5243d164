"""chip_drops (CHIP) against one SVD per channel, on the feature maps of real network layers.

  reference : chanaxis_fast.reference.chip_drops, one m x m SVD per channel (m = min(C, S)), the
              way CHIP was computed before the op (float64)
  ours      : torch.ops.chanaxis_fast.chip_drops, one Gram eigendecomposition per image, then every
              channel's secular equation (float64)

The matrices are the pre-BN conv outputs (calibrate's default read-out) of torchvision's resnet18
with the CIFAR stem (32 x 32 input) and resnet50 (224 x 224), random weights, for one random image:
C x S = channels x positions. "max rel diff" is the largest |ours - reference| / reference.

The second table is CHIP's cost per image for every calibrated layer of each network (as calibrate
pays it, a batch of images per call), next to a plain forward of the same images. The reference
column of resnet50 takes minutes (one 512 x 512 SVD per channel of its 512 x 784 layers): it is
measured with --full only.

Run: python benchmarks/bench_chip.py [--quick] [--full] [--threads N]
"""

import argparse
import os
import sys

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import chanaxis_fast  # noqa: E402
from chanaxis_fast import ops, reference, trace_model  # noqa: E402
from common import ms, print_table, timeit  # noqa: E402


def resnet18_cifar():
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


NETWORKS = {
    "resnet18 (CIFAR stem, 32 px)": (resnet18_cifar, 32, 8),
    "resnet50 (224 px)": (lambda: torchvision.models.resnet50(num_classes=1000), 224, 2),
}
SHAPES = {
    "resnet18 (CIFAR stem, 32 px)": [(64, 1024), (128, 256), (256, 64), (512, 16)],
    "resnet50 (224 px)": [(256, 784), (64, 3136), (256, 3136), (512, 784), (1024, 196), (2048, 49)],
}


def layer_maps(make, size, images, seed=0):
    """{layer: float32 [images, C, H*W]} of every calibrated layer (graph.default_layers()), and
    the model and input (for the forward-pass baseline)."""
    torch.manual_seed(seed)
    model = make().eval()
    x = torch.randn(images, 3, size, size)
    layers = trace_model(model, x[:1]).default_layers()
    modules = dict(model.named_modules())
    maps = {}
    hooks = [modules[n].register_forward_hook(
        lambda mod, inp, out, n=n: maps.__setitem__(n, out.detach().flatten(2))) for n in layers]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return maps, model, x


def max_rel_diff(a, b):
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only C x S = 256 x 784 and resnet18")
    parser.add_argument("--full", action="store_true", help="also the reference for all of resnet50")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, CUDA kernels: "
          f"{chanaxis_fast.build_info()['cuda_kernels']}; float64 on the CPU")

    networks = {name: layer_maps(make, size, 1 if args.quick and "resnet50" in name else images)
                for name, (make, size, images) in NETWORKS.items()}

    rows = []
    for name, (maps, _, _) in networks.items():
        by_shape = {}
        for layer, m in maps.items():
            by_shape.setdefault(tuple(m.shape[1:]), (layer, m))
        for C, S in [(256, 784)] if args.quick and "resnet50" in name else SHAPES[name]:
            layer, m = by_shape[(C, S)]
            A = m[:1].double()
            diff = max_rel_diff(ops.chip_drops(A), reference.chip_drops(A))
            t_ref = timeit(lambda: reference.chip_drops(A), repeat=1, warmup=0)
            t_ours = timeit(lambda: ops.chip_drops(A), repeat=args.repeat)
            rows.append([f"{C} x {S} ({name.split()[0]} {layer})", ms(t_ref), ms(t_ours),
                         f"{t_ref / t_ours:.0f}x", f"{diff:.1e}"])
    print_table(["C x S (layer)", "reference", "ours", "ratio", "max rel diff"], rows)
    print(flush=True)

    rows = []
    for name, (maps, model, x) in networks.items():
        if args.quick and "resnet50" in name:
            continue
        # every calibrated layer, a batch of images per call, per image
        images = x.shape[0]
        batch = [m.double() for m in maps.values()]
        t_ours = sum(timeit(lambda: ops.chip_drops(A), repeat=args.repeat) for A in batch) / images
        t_ref = None
        if "resnet18" in name or args.full:
            t_ref = sum(timeit(lambda: reference.chip_drops(A[:1]), repeat=1, warmup=0) for A in batch)
        with torch.inference_mode():
            t_fwd = timeit(lambda: model(x), repeat=args.repeat) / images
        rows.append([name, str(len(batch)), ms(t_ref) if t_ref else "(--full)", ms(t_ours),
                     f"{t_ref / t_ours:.0f}x" if t_ref else "-", ms(t_fwd), f"{t_ours / t_fwd:.1f}x"])
    print_table(["network, per image", "layers", "reference", "ours", "ratio", "forward",
                 "ours / forward"], rows)


if __name__ == "__main__":
    main()
