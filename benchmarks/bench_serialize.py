"""Model files: save_params/load_params against torch.save/torch.load and raw safetensors.

A 50M-parameter MLP (three 4096x4096 Linear layers with biases, 201 MB in float32) as a diffprog
model and as the equivalent ``torch.nn.Sequential``. Times: the candidates interleaved round by
round in one process, each figure the median over rounds of the ratio within a round (the
machine is shared and noisy; absolute times mean little). The files sit in the page cache
(each is written before it is read), so the figures compare the libraries, not the disk.

Peak memory: each load runs in a fresh subprocess of this script, which reports the growth of
its resident set's high-water mark (``VmHWM`` in ``/proc/self/status``) over the load, in
multiples of the model's size: 1.0 is the model itself, 2.0 a second copy on the way.

Run: ``python benchmarks/bench_serialize.py [--rounds N] [--features F]``
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

import diffprog as dp
from diffprog.nn import LinearSpec, SequentialSpec


def spec(features: int) -> SequentialSpec:
    return SequentialSpec(*(LinearSpec(features, features) for _ in range(3)))


def torch_module(features: int) -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Linear(features, features) for _ in range(3)))


def high_water_mark() -> int:
    """The process's peak resident set so far, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def child(kind: str, folder: Path, features: int) -> None:
    """One load in this fresh process; prints the growth of the peak resident set."""
    skeleton = dp.sample(spec(features), device="meta")
    module = torch_module(features) if kind == "torch.load + load_state_dict" else None
    real = dp.sample(spec(features)) if kind == "load_params mmap=False, real skeleton" else None
    gc.collect()
    before = high_water_mark()
    if kind == "load_params mmap=False, meta skeleton":
        result: object = dp.load_params(skeleton, folder / "dp.safetensors", mmap=False)
    elif kind == "load_params mmap=False, real skeleton":
        result = dp.load_params(real, folder / "dp.safetensors", mmap=False)
    elif kind == "load_params (mapped), meta skeleton, first use":
        result = dp.load_params(skeleton, folder / "dp.safetensors")
        first_use(result)
    elif kind == "safetensors load_file, first use":
        result = safetensors.torch.load_file(folder / "st.safetensors")
        first_use(result)
    elif kind == "load_params .pt, meta skeleton":
        result = dp.load_params(skeleton, folder / "dp.pt")
    elif kind == "safetensors load_file":
        result = safetensors.torch.load_file(folder / "st.safetensors")
    elif kind == "torch.load":
        result = torch.load(folder / "torch.pt")
    else:
        assert module is not None
        module.load_state_dict(torch.load(folder / "torch.pt"))
        result = module
    print(high_water_mark() - before)
    del result


MEMORY_KINDS = [
    "load_params mmap=False, meta skeleton",
    "load_params (mapped), meta skeleton, first use",
    "safetensors load_file, first use",
    "load_params .pt, meta skeleton",
    "safetensors load_file",
    "torch.load",
    "load_params mmap=False, real skeleton",
    "torch.load + load_state_dict",
]


def first_use(result: object) -> None:
    """Read every value once (a mapped tensor's pages come in from the file here)."""
    tensors = dp.state_dict(result) if not isinstance(result, dict) else result
    for t in tensors.values():
        t.sum()


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--child", default="")
    parser.add_argument("--folder", default="")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder), args.features)
        return

    features = args.features
    model = dp.sample(spec(features), generator=torch.Generator().manual_seed(0))
    module = torch_module(features)
    module.load_state_dict(dp.state_dict(model))
    sd = module.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    params = sum(t.numel() for t in sd.values())
    skeleton = dp.sample(spec(features), device="meta")
    print(f"model: {params / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB; {args.rounds} rounds")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dp_st, dp_pt = folder / "dp.safetensors", folder / "dp.pt"
        st_file, pt_file = folder / "st.safetensors", folder / "torch.pt"
        saves: dict[str, Callable[[], object]] = {
            "save_params (safetensors)": lambda: dp.save_params(model, dp_st),
            "save_params (safetensors), durable=False": lambda: dp.save_params(
                model, dp_st, durable=False
            ),
            "save_params (.pt)": lambda: dp.save_params(model, dp_pt),
            "safetensors save_file": lambda: safetensors.torch.save_file(sd, st_file),
            "torch.save": lambda: torch.save(sd, pt_file),
        }
        loads: dict[str, Callable[[], object]] = {
            "load_params (safetensors, meta skeleton)": lambda: dp.load_params(skeleton, dp_st),
            "load_params (mmap=False, meta skeleton)": lambda: dp.load_params(
                skeleton, dp_st, mmap=False
            ),
            "load_params (.pt, meta skeleton)": lambda: dp.load_params(skeleton, dp_pt),
            "safetensors load_file": lambda: safetensors.torch.load_file(st_file),
            "torch.load": lambda: torch.load(pt_file),
        }
        # safetensors maps the file: its load_file reads nothing until a tensor is used. To
        # compare like with like, each load is also timed up to its first use of every value.
        uses: dict[str, Callable[[], object]] = {
            f"{name} + first use": (lambda fn=fn: first_use(fn())) for name, fn in loads.items()
        }
        times: dict[str, list[float]] = {name: [] for name in (*saves, *loads, *uses)}
        for fn in saves.values():  # every file exists before the first load
            fn()
        candidates = [*saves.items(), *loads.items(), *uses.items()]
        shuffler = random.Random(0)
        for _ in range(args.rounds):
            # A new order each round: a write can pay for the page-cache writeback of the
            # writes before it, so a fixed order (or neighbours) would favour some candidates.
            shuffler.shuffle(candidates)
            for name, fn in candidates:
                times[name].append(timed(fn))

        def ratio(name: str, baseline: str) -> str:
            pairs = [a / b for a, b in zip(times[name], times[baseline], strict=True)]
            return f"{statistics.median(pairs):.2f}x"

        print("\ntime (median of per-round ratios; absolute: median seconds)")
        print(f"{'':58} {'vs safetensors':>15} {'vs torch':>10} {'seconds':>9}")
        rows = [
            ("save_params (safetensors)", "safetensors save_file", "torch.save"),
            ("save_params (safetensors), durable=False", "safetensors save_file", "torch.save"),
            ("save_params (.pt)", "safetensors save_file", "torch.save"),
        ]
        for suffix in ("", " + first use"):
            for name in (
                "load_params (safetensors, meta skeleton)",
                "load_params (mmap=False, meta skeleton)",
                "load_params (.pt, meta skeleton)",
            ):
                rows.append(
                    (name + suffix, "safetensors load_file" + suffix, "torch.load" + suffix)
                )
        for name, st_base, pt_base in rows:
            print(
                f"{name:58} {ratio(name, st_base):>15} {ratio(name, pt_base):>10} "
                f"{statistics.median(times[name]):>9.3f}"
            )
        for name in (
            "safetensors save_file",
            "torch.save",
            "safetensors load_file",
            "torch.load",
            "safetensors load_file + first use",
            "torch.load + first use",
        ):
            print(f"{name:58} {'':>15} {'':>10} {statistics.median(times[name]):>9.3f}")

        print("\npeak memory of one load, fresh process (growth of VmHWM / model size)")
        for kind in MEMORY_KINDS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    "--folder",
                    str(folder),
                    "--features",
                    str(features),
                ],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            ).stdout
            print(f"{kind:58} {int(out.split()[-1]) / nbytes:>6.2f}x")


if __name__ == "__main__":
    main()
