"""A compiled diffprog Adam step (``diffprog.func.compile_step``) against torch's loops.

Time: one training step (forward, gradients, Adam update) of a small MLP (32-64-64-1, batch 32)
and a medium one (784-256-256-10, batch 64). Baseline: the same network as a
``torch.nn.Module`` with ``torch.optim.Adam(fused=True)``, eager. Compared: torch's compiled
loop (the module ``torch.compile``d, and ``opt.step`` wrapped in ``torch.compile`` as torch's
"compiling the optimizer" recipe does, with ``foreach=True``, which is what compiles), and
diffprog's compiled step, pure and donated, with and without the non-finite check. Every
variant runs in the same process, interleaved round by round; each figure is the median over
rounds of (variant time / fused time in the same round). Compile time (the first call, which
traces and generates code) is measured apart and printed in seconds.

Run: ``python benchmarks/bench_compile.py`` with ``--rounds N``, ``--reps R``, ``--threads T``
(on a shared, busy machine ``--threads 1`` avoids measuring thread contention).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_optim_pure import MLP, build, torch_step
from diffprog.func import compile_step
from diffprog.optim import Adam

LR = 1e-4


def mse(model: MLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def torch_compiled_step(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """torch's compiled loop: a compiled module, and opt.step compiled as torch's docs show."""
    compiled = torch.compile(net)
    opt = torch.optim.Adam(net.parameters(), LR, foreach=True)

    @torch.compile(fullgraph=False)
    def opt_step() -> None:
        opt.step()

    def run() -> None:
        opt.zero_grad()
        F.mse_loss(compiled(x), y).backward()
        opt_step()

    return run


def diffprog_step(
    model: MLP, x: torch.Tensor, y: torch.Tensor, donate: bool, check: bool
) -> Callable[[], None]:
    """diffprog's compiled step; the model and optimizer are threaded through a cell."""
    step = compile_step(mse, LR, on_nonfinite="raise" if check else "ignore")
    state: list[object] = [model, Adam.init(model, donate=donate)]

    def run() -> None:
        m, o = state
        state[0], state[1], _ = step(m, o, x, y)  # type: ignore[arg-type]

    return run


def time_case(name: str, sizes: list[int], batch: int, rounds: int, reps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, sizes[0], generator=gen), torch.randn(batch, sizes[-1], generator=gen)
    variants: dict[str, Callable[[], None]] = {}
    model, net = build(sizes)
    variants["torch fused (eager)"] = torch_step(
        net, torch.optim.Adam(net.parameters(), LR, fused=True), x, y
    )
    _, net = build(sizes)
    variants["torch compiled loop"] = torch_compiled_step(net, x, y)
    for donate in (False, True):
        for check in (True, False):
            model, _ = build(sizes)
            label = f"diffprog {'donated' if donate else 'pure'}{'' if check else ', no check'}"
            variants[label] = diffprog_step(model, x, y, donate, check)
    compile_s = {}
    for k, run in variants.items():  # the first call compiles; a few more warm up
        t0 = time.perf_counter()
        run()
        compile_s[k] = time.perf_counter() - t0
        for _ in range(reps):
            run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, run in variants.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            times[k].append((time.perf_counter() - t0) / reps)
    base = times["torch fused (eager)"]
    compiled_base = times["torch compiled loop"]
    print(f"\n{name} ({'-'.join(map(str, sizes))}, batch {batch}); {rounds} rounds of {reps} steps")
    print(
        f"  {'variant':28s} {'us/step':>9s} {'x fused':>8s} {'x torch compiled':>17s}"
        f" {'first call':>11s}"
    )
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        vs_compiled = statistics.median(t / b for t, b in zip(ts, compiled_base, strict=True))
        print(
            f"  {k:28s} {statistics.median(ts) * 1e6:9.1f} {ratio:8.3f} {vs_compiled:17.3f} "
            f"{compile_s[k]:10.2f}s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    time_case("small MLP", [32, 64, 64, 1], 32, args.rounds, args.reps)
    time_case("medium MLP", [784, 256, 256, 10], 64, args.rounds, args.reps)


if __name__ == "__main__":
    main()
