"""Core benchmarks: flatten + replace against pytree libraries, and a training step.

Prints ratios against baselines measured in the same process, interleaved round by round: each
figure is the median over rounds of the ratio within a round (the machines are shared and
noisy; absolute times mean little).

Run: ``python benchmarks/bench_core.py``
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

import diffprog as dp
from diffprog.nn import LinearSpec
from diffprog.optim import GD, run_step

try:
    import optree
except ImportError:  # optional baseline
    optree = None


class Layer(dp.Parameterized):
    weight: dp.Parameter
    bias: dp.Parameter
    activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh
    name: str = "layer"


class Model(dp.Parameterized):
    layers: list[Layer]
    scale: float = 1.0


# The same structure as plain dataclasses registered as pytree nodes (the baseline).
@dataclasses.dataclass
class PLayer:
    weight: torch.Tensor
    bias: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh
    name: str = "layer"


@dataclasses.dataclass
class PModel:
    layers: list[PLayer]
    scale: float = 1.0


pytree.register_pytree_node(
    PLayer,
    lambda layer: ([layer.weight, layer.bias], (layer.activation, layer.name)),
    lambda children, aux: PLayer(*children, *aux),
)
pytree.register_pytree_node(
    PModel,
    lambda m: ([m.layers], m.scale),
    lambda children, scale: PModel(children[0], scale),
)
if optree is not None:
    optree.register_pytree_node(
        PLayer,
        lambda layer: ((layer.weight, layer.bias), (layer.activation, layer.name)),
        lambda aux, children: PLayer(*children, *aux),
        namespace="bench",
    )
    optree.register_pytree_node(
        PModel,
        lambda m: ((m.layers,), m.scale),
        lambda scale, children: PModel(children[0], scale),
        namespace="bench",
    )


def models(n_params: int) -> tuple[Model, PModel]:
    layers = [
        Layer(dp.make_independent(torch.randn(4, 4)), dp.make_independent(torch.randn(4)))
        for _ in range(n_params // 2)
    ]
    ours = Model(layers)
    theirs = PModel([PLayer(layer.weight, layer.bias) for layer in layers])
    return ours, theirs


def median_time(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(
    candidates: dict[str, Callable[[], Any]], number: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each round, the candidates interleaved."""
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(median_time(fn, number))
    return samples


def ratio(samples: dict[str, list[float]], ours: str, base: str) -> float:
    """The median over rounds of ``ours / base`` in the same round: pairing the two cancels
    the machine's slow changes in speed, which a ratio of two medians does not."""
    return statistics.median(a / b for a, b in zip(samples[ours], samples[base], strict=True))


def bench_flatten_replace() -> None:
    print("flatten + replace, as a ratio to the baseline's flatten + unflatten (lower is better)")
    for n_params in (10, 100, 1000):
        ours, theirs = models(n_params)
        new_params = [dp.make_independent(p.detach().clone()) for p in dp.flatten_parameters(ours)]

        def diffprog_round_trip() -> None:
            dp.flatten_parameters(ours)
            dp.replace_parameters(ours, new_params)

        # The training-loop pattern: each replace rebuilds the model the last one built, with
        # other parameters (two sets, alternating, so that each replace changes every slot).
        other_params = [dp.make_independent(p.detach().clone()) for p in new_params]
        chain = [ours, new_params, other_params]

        def diffprog_chained() -> None:
            dp.flatten_parameters(chain[0])
            chain[0] = dp.replace_parameters(chain[0], chain[1])
            chain[1], chain[2] = chain[2], chain[1]

        def torch_pytree_round_trip() -> None:
            _, spec = pytree.tree_flatten(theirs)
            pytree.tree_unflatten(new_params, spec)

        pytree_chain = [theirs, new_params, other_params]

        def torch_pytree_chained() -> None:
            _, spec = pytree.tree_flatten(pytree_chain[0])
            pytree_chain[0] = pytree.tree_unflatten(pytree_chain[1], spec)
            pytree_chain[1], pytree_chain[2] = pytree_chain[2], pytree_chain[1]

        candidates = {
            "diffprog": diffprog_round_trip,
            "diffprog chained": diffprog_chained,
            "torch pytree": torch_pytree_round_trip,
            "torch pytree chained": torch_pytree_chained,
        }
        if optree is not None:

            def optree_round_trip() -> None:
                _, spec = optree.tree_flatten(theirs, namespace="bench")
                optree.tree_unflatten(spec, new_params)

            candidates["optree"] = optree_round_trip
        number = max(5, 10_000 // n_params)
        times = compare(candidates, number=number, rounds=31)
        line = (
            f"  {n_params:5d} params: diffprog {statistics.median(times['diffprog']) * 1e6:8.1f} us"
        )
        line += f" | vs torch pytree {ratio(times, 'diffprog', 'torch pytree'):.2f}x"
        line += f" (chained {ratio(times, 'diffprog chained', 'torch pytree chained'):.2f}x)"
        if "optree" in times:
            line += f" | vs optree {ratio(times, 'diffprog', 'optree'):.2f}x"
        print(line)


def bench_training_step() -> None:
    print("one GD training step of an MLP 32-64-64-1 (batch 32), ratio to nn.Module + SGD")
    gen = torch.Generator().manual_seed(0)
    sizes = [(32, 64), (64, 64), (64, 1)]
    model = tuple(dp.sample(LinearSpec(i, o), generator=gen) for i, o in sizes)
    reference = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )
    with torch.no_grad():
        for ours, theirs in zip(model, [reference[0], reference[2], reference[4]], strict=True):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    sgd = torch.optim.SGD(reference.parameters(), lr=1e-3)
    x, y = torch.randn(32, 32, generator=gen), torch.randn(32, 1, generator=gen)
    state = {"model": model, "opt": GD()}

    def forward(m: tuple[Any, ...], x: torch.Tensor) -> torch.Tensor:
        a, b, c = m
        return c(torch.tanh(b(torch.tanh(a(x)))))

    def diffprog_step() -> None:
        loss = torch.nn.functional.mse_loss(forward(state["model"], x), y)
        state["model"], state["opt"] = run_step(state["model"], state["opt"], loss, 1e-3)

    def torch_step() -> None:
        sgd.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(reference(x), y)
        loss.backward()
        sgd.step()

    times = compare({"diffprog": diffprog_step, "torch": torch_step}, number=100, rounds=31)
    ours, theirs = statistics.median(times["diffprog"]), statistics.median(times["torch"])
    print(
        f"  diffprog {ours * 1e6:.1f} us, nn.Module+SGD {theirs * 1e6:.1f} us:"
        f" {ratio(times, 'diffprog', 'torch'):.3f}x"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    bench_flatten_replace()
    bench_training_step()
