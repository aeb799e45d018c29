"""Training throughput of the PyTorch reference ConvMixer, to compare `convmixer_dist.benchmark` with.

Not part of the package: nothing imports it, and torch is not in requirements.txt. Run it with a
PyTorch install of its own, e.g. a virtualenv that has only torch (plain `pip install torch`):

    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py --hidden_dim=256 --depth=8 \\
        --kernel_size=5 --patch_size=2 --batch_size=64 --windows=5 --window_steps=10

The model is the paper's reference implementation (Trockman & Kolter, arXiv:2201.09792, its
`ConvMixer` function: nn.Conv2d, nn.GELU, nn.BatchNorm2d with PyTorch's defaults, a Residual
wrapper), trained with AdamW on one cached random batch in float32. By default it runs as the
reference does (channels-first, eager); the variants a PyTorch user would try for speed:

- `--channels_last`: model and batch in `torch.channels_last` memory format (NHWC, what oneDNN's
  CPU convolutions prefer);
- `--compile`: the model wrapped in `torch.compile` (TorchInductor; needs a C++ compiler);
- `--bfloat16`: the forward under `torch.autocast("cpu", dtype=torch.bfloat16)` (PyTorch's
  mixed precision: bf16 convolutions, float32 weights, optimizer and loss), to compare with
  `--precision=mixed_bfloat16`; with `--all_variants` it applies to all four;
- `--all_variants`: all four combinations in one process, windows taken round-robin (one window of
  each variant in turn, so a change in machine load hits all alike); reports each and the best.

Like `convmixer_dist.benchmark`'s `custom_input_excluded` run it excludes input, warms up, then
prints the median images/s of the timed windows and writes it as JSON (`--output`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def conv_mixer(dim: int, depth: int, kernel_size: int, patch_size: int, n_classes: int) -> nn.Module:
    """The reference ConvMixer, as published."""
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                                   nn.GELU(), nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


VARIANTS = {"eager": (False, False), "channels_last": (True, False), "compile": (False, True),
            "compile_channels_last": (True, True)}  # name: (channels_last, compile)


def variant_name(channels_last: bool, compiled: bool) -> str:
    return next(name for name, v in VARIANTS.items() if v == (channels_last, compiled))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden_dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--kernel_size", type=int, default=5)
    p.add_argument("--patch_size", type=int, default=2)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--warmup_windows", type=int, default=1)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window_steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    p.add_argument("--channels_last", action="store_true", help="NHWC memory format (torch.channels_last)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (TorchInductor)")
    p.add_argument("--bfloat16", action="store_true", help="forward under torch.autocast(bfloat16)")
    p.add_argument("--all_variants", action="store_true",
                   help="time eager, channels_last, compile and compile_channels_last round-robin")
    p.add_argument("--output", default="", help="JSON file for the result; empty = print only")
    return p.parse_args()


def make_window(args: argparse.Namespace, channels_last: bool, compiled: bool):
    """A function timing one window of training steps of a freshly built model in this variant."""
    torch.manual_seed(0)
    model = conv_mixer(args.hidden_dim, args.depth, args.kernel_size, args.patch_size, args.num_classes)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.num_classes, (args.batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    forward = torch.compile(model) if compiled else model
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def window() -> float:
        start = time.perf_counter()
        for _ in range(args.window_steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bfloat16):
                logits = forward(images)
            loss = loss_fn(logits.float(), labels)
            loss.backward()
            optimizer.step()
        float(loss.detach())
        return time.perf_counter() - start

    return window


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = list(VARIANTS) if args.all_variants else [variant_name(args.channels_last, args.compile)]
    windows = {name: make_window(args, *VARIANTS[name]) for name in chosen}
    for _ in range(args.warmup_windows):
        for window in windows.values():
            window()
    rates: dict[str, list[float]] = {name: [] for name in chosen}
    for i in range(args.windows):
        for name, window in windows.items():
            rates[name].append(args.window_steps * args.batch_size / window())
            print(f"  torch {name}: window {i + 1}/{args.windows} {rates[name][-1]:.1f} img/s", flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    best = max(medians, key=medians.get)
    result = {**vars(args), "variant": best, "images_per_sec": medians[best],
              "window_images_per_sec": rates[best],
              "variants": {name: {"images_per_sec": medians[name], "window_images_per_sec": rates[name]}
                           for name in chosen},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in chosen:
        print(f"torch_reference {name}: {medians[name]:.1f} img/s (median of {args.windows})", flush=True)
    dtype = "bfloat16 autocast" if args.bfloat16 else "float32"
    print(f"torch_reference: {medians[best]:.1f} img/s ({best}{', the best' * (len(chosen) > 1)}, {dtype}), "
          f"torch {torch.__version__}, {result['threads']} threads", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
