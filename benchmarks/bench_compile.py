"""A compiled diffprog Adam step (``diffprog.func.compile_step``) against torch's loops.

Time: one training step (forward, gradients, Adam update) of a small MLP (32-64-64-1, batch 32)
and a medium one (784-256-256-10, batch 64). Baseline: the same network as a
``torch.nn.Module`` with ``torch.optim.Adam(fused=True)``, eager. Compared: torch's compiled
loop (the module ``torch.compile``d, and ``opt.step`` wrapped in ``torch.compile`` as torch's
"compiling the optimizer" recipe does, with ``foreach=True``, which is what compiles), and
diffprog's compiled step, pure and donated, with and without the non-finite check, for each
inductor mode asked for (``--modes``). Every variant runs in the same process, round by round,
in a new random order each round (a variant's place in the round shifts its time by a few
percent); each figure is the median over rounds of (variant time / fused time in the same
round). Compile time (the first call, which traces and generates code) is measured apart and
printed in seconds. A table against the issue's targets ends each case.

``--handwritten`` adds the reference the issue quotes: a minimal hand-written functional step
(parameters and Adam state as plain lists of tensors, ``torch.func.grad_and_value`` over a
functional MLP, Adam in ``torch._foreach_*`` ops, the whole step under
``torch.compile(fullgraph=True)``), as is, with the same non-finite check as diffprog's, and with
the check and the rebuild of a diffprog model from the new tensors (``make_independent`` and
``replace_parameters``): what is left between diffprog's step and those is diffprog's own.

Clock: ``--clock wall`` (the default) times with ``time.perf_counter``; ``--clock cpu`` with
``time.thread_time``, the CPU time of the one thread that runs everything (only with
``--threads 1``): on a shared, loaded machine it leaves out the time the thread waits for a
core, which wall-clock ratios cannot.

Run: ``python benchmarks/bench_compile.py`` with ``--rounds N``, ``--reps R``, ``--threads T``
(on a shared, busy machine ``--threads 1`` avoids measuring thread contention), ``--clock``,
``--modes default,max-autotune-no-cudagraphs``, ``--sizes small,medium`` and ``--handwritten``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_optim_pure import MLP, build, torch_step
from diffprog import make_independent, replace_parameters
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
    model: MLP, x: torch.Tensor, y: torch.Tensor, donate: bool, check: bool, mode: str | None
) -> Callable[[], None]:
    """diffprog's compiled step; the model and optimizer are threaded through a cell."""
    step = compile_step(mse, LR, on_nonfinite="raise" if check else "ignore", mode=mode)
    state: list[object] = [model, Adam.init(model, donate=donate)]

    def run() -> None:
        m, o = state
        state[0], state[1], _ = step(m, o, x, y)  # type: ignore[arg-type]

    return run


def mlp(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP as a function of its parameters (weight, bias, weight, bias, ...)."""
    n = len(params) // 2
    for i in range(n):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            x = torch.relu(x)
    return x


def handwritten_step(
    model: MLP, x: torch.Tensor, y: torch.Tensor, check: bool, rebuild: bool
) -> Callable[[], None]:
    """A minimal hand-written functional Adam step, compiled whole (see the module docstring).

    The state is updated in place (as the donated form does); the bias corrections take the
    step count as a tensor, so that a new count does not recompile. ``check`` computes the
    non-finite flag in the graph and reads it after the call, as diffprog's step does;
    ``rebuild`` makes a diffprog model of the new parameters, as diffprog's step does.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = [p.detach().clone() for layer in model.layers for p in (layer.weight, layer.bias)]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    lr = torch.tensor(LR, dtype=torch.float64)

    def loss_of(ps: list[torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(mlp(ps, x), y)

    @torch.compile(fullgraph=True)
    def step(
        ps: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor], t: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        grads, loss = torch.func.grad_and_value(loss_of)(ps)
        ok = None
        if check:
            flags = [torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads]
            ok = torch.stack(flags).all()
        t = t + 1
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1 - b2)
        denom = torch._foreach_add(
            torch._foreach_div(torch._foreach_sqrt(v), (1 - b2**t).sqrt()), eps
        )
        update = torch._foreach_mul(torch._foreach_div(m, denom), lr / (1 - b1**t))
        return torch._foreach_sub(ps, update), t, loss.detach(), ok

    cell: list[object] = [params, torch.zeros((), dtype=torch.float64)]

    def run() -> None:
        ps, t = cell
        new, cell[1], _, ok = step(ps, exp_avg, exp_avg_sq, t)
        if ok is not None and not bool(ok):
            raise RuntimeError("non-finite loss or gradient")
        cell[0] = new
        if rebuild:
            replace_parameters(model, [make_independent(p) for p in new])

    return run


SIZES = {"small": ([32, 64, 64, 1], 32), "medium": ([784, 256, 256, 10], 64)}
# The targets: diffprog's pure step at most this many times the eager fused step
# (the stretch target in brackets where there is one).
TARGETS = {"small": (0.5, None), "medium": (1.0, 0.9)}
FUSED, COMPILED = "torch fused (eager)", "torch compiled loop"
HANDWRITTEN = (
    ("hand-written step", False, False),
    ("hand-written step, check", True, False),
    ("hand-written step, check, rebuild", True, True),
)


def label(donate: bool, check: bool, mode: str | None) -> str:
    kind = "donated" if donate else "pure"
    return f"diffprog {kind}{'' if check else ', no check'}{f' [{mode}]' if mode else ''}"


def time_case(
    name: str,
    rounds: int,
    reps: int,
    clock: Callable[[], float],
    modes: list[str | None],
    handwritten: bool,
) -> None:
    sizes, batch = SIZES[name]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, sizes[0], generator=gen), torch.randn(batch, sizes[-1], generator=gen)
    variants: dict[str, Callable[[], None]] = {}
    model, net = build(sizes)
    variants[FUSED] = torch_step(net, torch.optim.Adam(net.parameters(), LR, fused=True), x, y)
    _, net = build(sizes)
    variants[COMPILED] = torch_compiled_step(net, x, y)
    if handwritten:
        for hand, check, rebuild in HANDWRITTEN:
            model, _ = build(sizes)
            variants[hand] = handwritten_step(model, x, y, check, rebuild)
    for mode in modes:
        for donate in (False, True):
            for check in (True, False):
                model, _ = build(sizes)
                variants[label(donate, check, mode)] = diffprog_step(
                    model, x, y, donate, check, mode
                )
    compile_s = {}
    for k, run in variants.items():  # the first call compiles; a few more warm up
        t0 = time.perf_counter()
        run()
        compile_s[k] = time.perf_counter() - t0
        for _ in range(reps):
            run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for k, run in order:
            t0 = clock()
            for _ in range(reps):
                run()
            times[k].append((clock() - t0) / reps)

    def ratio(a: str, b: str) -> float:
        return statistics.median(t / u for t, u in zip(times[a], times[b], strict=True))

    print(f"\n{name} MLP ({'-'.join(map(str, sizes))}, batch {batch}); {rounds} rounds of {reps}")
    print(
        f"  {'variant':56s} {'us/step':>9s} {'x fused':>8s} {'x torch compiled':>17s}"
        f" {'first call':>11s}"
    )
    for k, ts in times.items():
        print(
            f"  {k:56s} {statistics.median(ts) * 1e6:9.1f} {ratio(k, FUSED):8.3f} "
            f"{ratio(k, COMPILED):17.3f} {compile_s[k]:10.2f}s"
        )
    target, stretch = TARGETS[name]
    print(f"  targets ({name}):")
    for mode in modes:
        pure, donated = label(False, True, mode), label(True, True, mode)
        vs_fused = ratio(pure, FUSED)
        goal = f"<= {target}" + (f" (stretch {stretch})" if stretch else "")
        verdict = "met" if vs_fused <= target else "NOT met"
        if stretch and vs_fused <= stretch:
            verdict = "met, stretch met"
        rows = [
            (f"{pure} x fused {goal}", vs_fused, verdict),
            (f"{pure} x torch compiled <= 1", ratio(pure, COMPILED), None),
            (f"{donated} x {pure} <= 1", ratio(donated, pure), None),
        ]
        for text, value, said in rows:
            said = said or ("met" if value <= 1.0 else "NOT met")
            print(f"    {text:100s} {value:6.3f}  {said}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--modes",
        default="default",
        help="comma-separated inductor modes for diffprog's step ('default': no mode)",
    )
    parser.add_argument("--sizes", default="small,medium", help="comma-separated: small,medium")
    parser.add_argument(
        "--handwritten",
        action="store_true",
        help="add a minimal hand-written functional step (the issue's reference)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu times one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    modes = [None if m == "default" else m for m in args.modes.split(",")]
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, {load}"
    )
    for name in args.sizes.split(","):
        time_case(name, args.rounds, args.reps, clock, modes, args.handwritten)
    print("\nat the end: load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
