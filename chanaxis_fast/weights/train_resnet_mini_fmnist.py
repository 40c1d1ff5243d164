"""Train the built-in default network: ResNetMini (16/32/64 channels, 2 basic blocks per stage,
15 convolutions) on Fashion-MNIST, the way CIFAR recipes train ResNets (SGD with Nesterov
momentum, weight decay 5e-4, cosine learning rate, random crops and flips), seeded.

    python -m chanaxis_fast.weights.train_resnet_mini_fmnist [--epochs 15] [--seed 0] [--threads 1]

writes ``resnet_mini_fmnist.pt`` (the state dict) and ``resnet_mini_fmnist.json`` (recipe, seed,
test accuracy, sha256 of the state dict file) next to this script.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = dict(architecture="ResNetMini(in_channels=1, num_classes=10, widths=(16, 32, 64), blocks=2)",
              data="fashion-mnist train (60,000), standardised", optimizer="SGD nesterov momentum 0.9",
              lr=0.05, weight_decay=5e-4, batch_size=128, schedule="cosine over all steps",
              augmentation="random crop 28 from 2-pixel zero padding, horizontal flip")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 28x28 crops of the 2-pixel zero-padded images [N, 1, 28, 28], random horizontal flips."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dy = torch.randint(0, 5, (n,), generator=g)
    dx = torch.randint(0, 5, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]          # [n, 28, 1]
    cols = (dx[:, None] + torch.arange(28))[:, None, :]          # [n, 1, 28]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def main(argv=None):
    """Train with the recipe above and write the checkpoint and its metadata."""
    from chanaxis_fast.data import load_fashion_mnist
    from chanaxis_fast.training import evaluate_classifier, train_classifier
    from chanaxis_fast.zoo import ResNetMini, file_sha256

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "resnet_mini_fmnist.pt"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = ResNetMini()
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(args.seed)

    class Augmented:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for x, y in self.loader:
                yield augment(x, g), y

    loader = Augmented(DataLoader(train, batch_size=RECIPE["batch_size"], shuffle=True,
                                  generator=torch.Generator().manual_seed(args.seed)))
    t0 = time.time()
    train_classifier(model, loader, epochs=args.epochs, lr=RECIPE["lr"], optimizer="sgd",
                     weight_decay=RECIPE["weight_decay"], schedule="cosine", progress=True)
    seconds = time.time() - t0
    ev = evaluate_classifier(model, DataLoader(test, batch_size=1000))
    torch.save(model.state_dict(), args.out)
    meta = dict(RECIPE, epochs=args.epochs, seed=args.seed, test_accuracy=ev["accuracy"],
                test_loss=ev["loss"], train_seconds=round(seconds), threads=args.threads,
                torch=torch.__version__, sha256=file_sha256(args.out))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
