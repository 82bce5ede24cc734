"""Load a model saved by the digits example and report its test accuracy.

``python -m diffprog.examples.digits --save digits.safetensors`` trains the CNN and saves it
with ``dp.save_params``; this loads it back with ``dp.load_params`` into a skeleton sampled on
the ``meta`` device (no memory, no initialisation: the file fills it) and classifies the same
test images, so it prints the test accuracy the training run printed.

Run: ``python -m diffprog.examples.predict digits.safetensors [--seed N]``
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

import torch
from safetensors import safe_open

import diffprog as dp
from diffprog.examples import digits
from diffprog.nn import Sequential


def load_model(path: pathlib.Path) -> Sequential:
    """The digits CNN saved at ``path``.

    Raises:
        LoadError: the file is not a digits model (missing keys, other shapes, corrupt).
    """
    skeleton = dp.sample(digits.cnn_spec(), device="meta")
    return dp.load_params(skeleton, path)


def saved_seed(path: pathlib.Path) -> int | None:
    """The seed of the test split the digits example saved with the model, if any."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    seed = metadata.get("seed")
    return int(seed) if seed is not None and seed.lstrip("-").isdigit() else None


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, load the model and print its test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=pathlib.Path, help="the model file digits --save wrote")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the test split (default: the saved one)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1)")
    args = parser.parse_args(argv)
    model = load_model(args.path)
    seed = args.seed if args.seed is not None else saved_seed(args.path)
    data = digits.load(seed=0 if seed is None else seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        acc = digits.accuracy(model, data.test_x, data.test_y)
    finally:
        torch.set_num_threads(threads)
    print(f"loaded {args.path}: {sum(p.numel() for p in dp.flatten_parameters(model))} parameters")
    print(f"test accuracy: {acc:.2%} on {len(data.test_y)} test images")


if __name__ == "__main__":
    main()
