"""Issue 13, sharded parameters: ZeRO-style training on DTensor, in real processes.

Each test spawns 2 or 3 processes (gloo on loopback, torch.multiprocessing), each with a
timeout on its process group and the test with a deadline on the whole run, so nothing hangs.
Inside, every rank trains the sharded model on its part of the batch and checks, against a
single process training the unsharded model on the whole batch (computed on each rank, in
the same process), that the parameters agree to float32 tolerance after a few steps, over
every optimizer that steps shards, with a tied parameter, a buffer, first dimensions that the
number of ranks does not divide, one shorter than the number of ranks and a 0-dim one.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffprog as dp
from diffprog.nn import Linear, LinearSpec

DEADLINE_S = 90.0  # for a whole spawned run; a run takes a few seconds
PG_TIMEOUT = datetime.timedelta(seconds=30)  # a collective waiting for a dead rank fails


class Net(dp.Parameterized):
    """A tie (``second.weight is first.weight``), a buffer (``scale``), first dimensions of
    7 (not divisible by 2 or 3), 1 (shorter than the number of ranks) and a 0-dim one."""

    first: Linear  # 5 -> 7
    second: Linear  # 5 -> 7, its weight tied to first's
    tiny: torch.Tensor  # a Parameter of shape (1,)
    temp: torch.Tensor  # a Parameter of shape ()
    scale: torch.Tensor  # a buffer of shape (7,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x)) * self.scale + self.second(x) * self.tiny
        return (h * self.temp).sum(-1)


def make_net() -> Net:
    gen = torch.Generator().manual_seed(0)
    first = dp.sample(LinearSpec(5, 7), generator=gen)
    other = dp.sample(LinearSpec(5, 7), generator=gen)
    return Net(
        first=first,
        second=Linear(weight=first.weight, bias=other.bias),
        tiny=dp.make_independent(torch.tensor([0.7])),
        temp=dp.make_independent(torch.tensor(1.3)),
        scale=torch.linspace(0.5, 1.5, 7),
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=gen)  # 12: divisible by 2 and 3
    return x, torch.sin(x.sum(-1))


def loss_of(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


# --- spawning -----------------------------------------------------------------------------


def _entry(rank: int, world: int, store: str, body_name: str, folder: str) -> None:
    # A file store: no port to pick (and race for with other jobs); gloo's own connections
    # go over loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=PG_TIMEOUT,
    )
    try:
        globals()[body_name](rank, world, Path(folder))
        # Every rank's last collective is done before any tears its process group down (a
        # gloo group destroyed with work in flight aborts the process).
        dist.barrier()
    except BaseException:
        (Path(folder) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, body: Callable[[int, int, Path], None], folder: Path) -> None:
    """Run ``body(rank, world, folder)`` on ``world`` processes; fail with their tracebacks."""
    context = mp.start_processes(
        _entry,
        args=(world, str(folder / f"store-{world}"), body.__name__, str(folder)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} processes did not finish in {DEADLINE_S} s")
    except mp.ProcessRaisedException:
        errors = sorted(folder.glob("error-*.txt"))
        pytest.fail("\n".join(e.read_text() for e in errors) or "a process failed")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# --- the grid -----------------------------------------------------------------------------


def _optimizers(model: Any) -> dict[str, Any]:
    from diffprog import optim as O

    return {
        "GD": O.GD(),
        "SGD momentum": O.SGD.init(model, momentum=0.9),
        "SGD nesterov wd": O.SGD.init(model, momentum=0.9, nesterov=True, weight_decay=0.1),
        "GDM": O.GDM.init(model),
        "Adam": O.Adam.init(model),
        "Adam amsgrad wd": O.Adam.init(model, amsgrad=True, weight_decay=0.05),
        "AdamW": O.AdamW.init(model, weight_decay=0.1),
        "RMSprop centered": O.RMSprop.init(model, centered=True, momentum=0.5),
        "Adagrad": O.Adagrad.init(model, lr_decay=0.01),
        "Lion": O.Lion.init(model, weight_decay=0.1),
        "NAdam": O.NAdam.init(model),
        "RAdam": O.RAdam.init(model),
        "Adamax": O.Adamax.init(model),
        "Adadelta": O.Adadelta.init(model),
        "Rprop": O.Rprop.init(model),
        "ASGD": O.ASGD.init(model),
        "clip global norm + GD": O.chain(O.clip_by_global_norm(0.05), O.GD()),
        # the infinity norm: a rank holding an empty piece (tiny on 2 and 3 ranks) has no max
        "clip inf norm + GD": O.chain(O.clip_by_global_norm(0.05, norm_type=float("inf")), O.GD()),
        "clip 1-norm + Adam": O.chain(
            O.clip_by_global_norm(0.05, norm_type=1.0), O.Adam.init(model)
        ),
        "clip value + SGD": O.chain(O.clip_by_value(0.01), O.SGD.init(model, momentum=0.9)),
        "TorchOptimizer Adam": O.TorchOptimizer.init(model, torch.optim.Adam, lr=0.01),
        "TorchOptimizer SGD": O.TorchOptimizer.init(model, torch.optim.SGD, lr=0.01, momentum=0.9),
    }


def _close(sharded: Any, reference: Any, what: str) -> None:
    from diffprog.distributed import unshard

    whole = unshard(sharded)
    for (name, a), (_, b) in zip(dp.named_tensors(whole), dp.named_tensors(reference), strict=True):
        assert type(a) is type(b), (what, name, type(a))
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{what}: {name}\n{m}"
        )


def grid_body(rank: int, world: int, folder: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from diffprog.distributed import gathered, is_sharded, shard
    from diffprog.optim import apply_gradients, run_step

    mesh = init_device_mesh("cpu", (world,))
    x, y = batch()
    mine = x.chunk(world)[rank], y.chunk(world)[rank]
    model = make_net()
    sharded = shard(model, mesh)
    assert is_sharded(sharded) and not is_sharded(model)
    assert sharded.second.weight is sharded.first.weight  # the tie is kept
    assert type(sharded.scale) is torch.Tensor  # the buffer stays a plain tensor
    assert sharded.first.weight.to_local().shape[0] == len(torch.arange(7).chunk(world)[rank])
    n_steps, lr = 4, 0.01
    for name in _optimizers(model):
        lr_given = None if name.startswith("TorchOptimizer") else lr
        ref = make_net()  # fresh: a TorchOptimizer steps its model in place
        ref_opt = _optimizers(ref)[name]
        for _ in range(n_steps):
            ref, ref_opt = run_step(ref, ref_opt, loss_of(ref, x, y), lr_given)
        # the TorchOptimizer writes in place: shard a fresh copy for the sharded run
        run = shard(make_net(), mesh)
        opt = _optimizers(run)[name]
        for _ in range(n_steps):
            run, opt = run_step(run, opt, loss_of(gathered(run), *mine), lr_given)
        assert is_sharded(run), name
        _close(run, ref, name)
    # apply_gradients with gradients of the sharded parameters (reduce-scattered)
    from diffprog.optim import Adam

    ref, ref_opt, run = model, Adam.init(model), sharded
    opt = Adam.init(run)
    for _ in range(n_steps):
        ref, ref_opt = run_step(ref, ref_opt, loss_of(ref, x, y), lr)
        grads = dp.grad(loss_of(gathered(run), *mine), dp.flatten_parameters(run))
        run, opt = apply_gradients(run, opt, grads, lr)
    _close(run, ref, "apply_gradients")
    _close(opt, ref_opt, "apply_gradients' optimizer state")
    refusals(rank, world, mesh)
    review_findings(rank, world, mesh)


def refusals(rank: int, world: int, mesh: Any) -> None:
    from diffprog.distributed import gathered, shard
    from diffprog.optim import SGD, Adafactor, NonFiniteError, run_step

    x, y = batch()
    mine = x.chunk(world)[rank], y.chunk(world)[rank]
    sharded = shard(make_net(), mesh)
    # Adafactor's factored moments reduce over whole rows and columns: refused, not
    # computed on a shard.
    with pytest.raises(dp.DiffprogError, match="Adafactor cannot step sharded"):
        run_step(sharded, Adafactor.init(sharded), loss_of(gathered(sharded), *mine), 0.01)
    # A NaN on the last rank only: every rank skips (or raises), none steps alone.
    bad_x = mine[0].clone()
    if rank == world - 1:
        bad_x[0, 0] = float("nan")
    opt = SGD.init(sharded, momentum=0.9)
    same, same_opt = run_step(
        sharded, opt, loss_of(gathered(sharded), bad_x, mine[1]), 0.01, on_nonfinite="skip"
    )
    assert same is sharded and same_opt is opt
    with pytest.raises(NonFiniteError):
        run_step(sharded, opt, loss_of(gathered(sharded), bad_x, mine[1]), 0.01)
    # the sharded model itself cannot run forward (DTensor refuses to mix with the input)
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        loss_of(sharded, *mine)
    # every rank starts from rank 0's values, whatever its own model held
    from diffprog.distributed import unshard

    own = dp.map_parameters(lambda p: p + rank, make_net())
    _close(unshard(shard(own, mesh)), make_net(), "rank 0's values")
    # a model on another device type than the mesh's
    with pytest.raises(dp.DiffprogError, match="meta"):
        shard(dp.to(make_net(), device="meta"), mesh)


def _optimizer_paths() -> dict[str, Callable[[Any], Any]]:
    from diffprog import optim as O

    return {
        "donate": lambda m: O.Adam.init(m, donate=True),
        "overrides": lambda m: O.AdamW.init(
            m, weight_decay=0.1, overrides={"*.bias": {"weight_decay": 0.0, "lr_scale": 0.5}}
        ),
        "freeze": lambda m: O.SGD.init(m, momentum=0.9, freeze="second.bias"),
        "differentiable": lambda m: O.GD(differentiable=True),
    }


def review_findings(rank: int, world: int, mesh: Any) -> None:
    """The sharding review's findings on more than one rank (in the grid's spawned run)."""
    from diffprog import optim as O
    from diffprog.distributed import DataParallel, gathered, shard, unshard
    from diffprog.optim import run_step

    x, y = batch()
    mine = x.chunk(world)[rank], y.chunk(world)[rank]
    # The optimizer paths (donated state, per-parameter overrides, the optimizer's own
    # freeze, a differentiable step with a tensor learning rate) on shards equal one process.
    lr = torch.tensor(0.01)
    for name, make in _optimizer_paths().items():
        ref, run = make_net(), shard(make_net(), mesh)
        ref_opt, opt = make(ref), make(run)
        for _ in range(3):
            ref, ref_opt = run_step(ref, ref_opt, loss_of(ref, x, y), lr)
            run, opt = run_step(run, opt, loss_of(gathered(run), *mine), lr)
        _close(run, ref, name)
    sharded = shard(make_net(), mesh)
    # A meta-gradient w.r.t. the learning rate would come from each rank's shard only.
    meta_lr = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(dp.DiffprogError, match="differentiable step on sharded.*lr"):
        run_step(sharded, O.GD(differentiable=True), loss_of(gathered(sharded), *mine), meta_lr)
    # A plain trainable Parameter among the shards (frozen before shard, unfrozen after):
    # stepped on each rank's own gradient, the ranks would drift apart.
    mixed = dp.unfreeze(shard(dp.freeze(make_net(), "second.bias"), mesh), "second.bias")
    for opt, lr_given in (
        (O.SGD.init(mixed), 0.1),
        (O.TorchOptimizer.init(mixed, torch.optim.SGD, lr=0.1), None),
    ):
        with pytest.raises(dp.DiffprogError, match="second.bias is a plain Parameter.*shard"):
            run_step(mixed, opt, loss_of(gathered(mixed), *mine), lr_given)
        grads = dp.grad(loss_of(gathered(mixed), *mine), dp.flatten_parameters(mixed))
        with pytest.raises(dp.DiffprogError, match="second.bias is a plain Parameter"):
            O.apply_gradients(mixed, opt, grads, lr_given)
    # DataParallel would average gradients gathered averaged already.
    with pytest.raises(dp.DiffprogError, match="do not wrap"):
        run_step(
            sharded, DataParallel(O.Adam.init(sharded)), loss_of(gathered(sharded), *mine), 0.01
        )
    # A parameter reached on one rank only, made part of the loss on every rank with a zero
    # weight (the documented way): every rank takes part in every reduce-scatter.
    g = gathered(sharded)
    out = g.first(mine[0]).sum(-1) if rank == 0 else g(mine[0])
    loss = torch.nn.functional.mse_loss(out, mine[1])
    loss = loss + 0.0 * sum(t.sum() for t in dp.tensors(g))
    stepped, _ = run_step(sharded, O.SGD.init(sharded), loss, 0.1)
    whole = unshard(stepped)
    gathered_all = [torch.zeros_like(whole.tiny) for _ in range(world)]
    dist.all_gather(gathered_all, whole.tiny)
    assert all(torch.equal(t, whole.tiny) for t in gathered_all)  # the ranks agree


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_training_equals_single_process(world: int, tmp_path: Path) -> None:
    """The grid, then the refusals (Adafactor; a NaN on one rank skips or raises on all),
    then the review's findings (optimizer paths; meta-gradient, a plain Parameter among
    shards and DataParallel refused; a parameter reached on one rank only, zero-weighted)."""
    spawn(world, grid_body, tmp_path)


# --- checkpoints --------------------------------------------------------------------------


def _train(model: Any, opt: Any, rank: int, world: int, steps: int) -> tuple[Any, Any]:
    from diffprog.distributed import gathered
    from diffprog.optim import run_step

    x, y = batch()
    mine = x.chunk(world)[rank], y.chunk(world)[rank]
    for _ in range(steps):
        model, opt = run_step(model, opt, loss_of(gathered(model), *mine), 0.01)
    return model, opt


def save_body(rank: int, world: int, folder: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from diffprog.distributed import (
        load_sharded_checkpoint,
        save_sharded_checkpoint,
        shard,
        unshard,
    )
    from diffprog.optim import Adam

    mesh = init_device_mesh("cpu", (world,))
    model = shard(make_net(), mesh)
    model, opt = _train(model, Adam.init(model), rank, world, 3)
    save_sharded_checkpoint(folder / "run", model=model, optimizer=opt, step=3, epoch=1)
    # only this rank's shards are in its file
    mine = dp.load_tensors(
        folder / "run" / "step-000000003" / f"rank-{rank:05d}-of-{world:05d}.safetensors"
    )
    assert mine["model.first.weight"].shape[0] == model.first.weight.to_local().shape[0]
    skeleton = make_net()
    back = load_sharded_checkpoint(
        folder / "run", model=skeleton, optimizer=Adam.init(skeleton), mesh=mesh
    )
    assert back.step == 3 and back.extra == {"epoch": 1}
    assert back.optimizer.count == opt.count == 3
    _close(back.model, unshard(model), "loaded model")
    _close(back.optimizer, unshard(opt), "loaded optimizer")
    assert back.model.first.weight.placements == model.first.weight.placements
    assert back.model.first.weight.to_local().shape == model.first.weight.to_local().shape
    model, opt = _train(model, opt, rank, world, 2)
    resumed, _ = _train(back.model, back.optimizer, rank, world, 2)  # from this rank's file
    _close(resumed, unshard(model), "resumed on the same number of ranks")
    if rank == 0:
        dp.save_params(unshard(model), folder / "after5.safetensors")
    else:
        unshard(model)  # a collective: every rank takes part


def resume_body(rank: int, world: int, folder: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from diffprog.distributed import load_sharded_checkpoint, unshard
    from diffprog.optim import Adam

    mesh = init_device_mesh("cpu", (world,))
    skeleton = make_net()
    back = load_sharded_checkpoint(
        folder / "run", model=skeleton, optimizer=Adam.init(skeleton), mesh=mesh
    )
    model, _ = _train(back.model, back.optimizer, rank, world, 2)
    expected = dp.load_params(make_net(), folder / "after5.safetensors")
    _close(model, expected, f"resumed on {world} ranks")
    unshard(model)


def test_sharded_checkpoint_saves_per_rank_and_resumes_on_other_rank_counts(
    tmp_path: Path,
) -> None:
    from diffprog.distributed import gather_checkpoint, latest_sharded_checkpoint
    from diffprog.optim import Adam, run_step

    spawn(2, save_body, tmp_path)
    step_folder = latest_sharded_checkpoint(tmp_path / "run")
    assert step_folder is not None and step_folder.name == "step-000000003"
    # a save interrupted before its marker is never the latest
    (tmp_path / "run" / "step-000000009").mkdir()
    assert latest_sharded_checkpoint(tmp_path / "run") == step_folder
    spawn(3, resume_body, tmp_path)  # saved on 2 ranks, resumed on 3
    # gathered to one whole checkpoint in this process: resuming it unsharded agrees too
    skeleton = make_net()
    whole = gather_checkpoint(
        tmp_path / "run",
        tmp_path / "whole.safetensors",
        model=skeleton,
        optimizer=Adam.init(skeleton),
    )
    back = dp.load_checkpoint(whole, model=skeleton, optimizer=Adam.init(skeleton))
    model, opt = back.model, back.optimizer
    x, y = batch()
    for _ in range(2):
        model, opt = run_step(model, opt, loss_of(model, x, y), 0.01)
    expected = dp.load_params(make_net(), tmp_path / "after5.safetensors")
    for (name, a), (_, b) in zip(dp.named_tensors(model), dp.named_tensors(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_incomplete_sharded_checkpoint_is_refused(tmp_path: Path) -> None:
    from diffprog.distributed import gather_checkpoint

    (tmp_path / "step-000000001").mkdir()
    with pytest.raises(dp.LoadError, match="no complete sharded checkpoint"):
        gather_checkpoint(tmp_path, tmp_path / "x.safetensors", model=make_net(), optimizer=None)


def test_sharding_needs_a_mesh() -> None:
    from diffprog.distributed import shard

    with pytest.raises(TypeError, match="DeviceMesh"):
        shard(make_net(), "cpu")  # type: ignore[arg-type]


# --- in one process: a world of one (the same code paths, no spawning) ----------------------


@pytest.fixture
def mesh1() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_traversals_see_dtensor_parameters_not_dtensor_constants(mesh1: Any) -> None:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from diffprog.distributed import shard

    model = make_net()
    sharded = shard(model, mesh1)
    params = dp.flatten_parameters(sharded)
    assert len(params) == len(dp.flatten_parameters(model)) == 5  # the tie counted once
    assert all(isinstance(p, DTensor) and isinstance(p, torch.nn.Parameter) for p in params)
    names = [name for name, _ in dp.named_parameters(sharded)]
    assert names == [name for name, _ in dp.named_parameters(model)]
    # a DTensor that is not a Parameter is a constant (a buffer), never flattened
    constant = distribute_tensor(torch.ones(3), mesh1, [Shard(0)])
    with_constant = Net(**{**sharded.__dict__, "scale": constant})
    assert len(dp.flatten_parameters(with_constant)) == 5
    rebuilt = dp.replace_parameters(with_constant, dp.flatten_parameters(with_constant))
    assert rebuilt.scale is constant
    assert model.first.weight is not sharded.first.weight  # shard left model alone
    assert type(model.first.weight) is torch.nn.Parameter


@pytest.mark.parametrize("name", list(_optimizer_paths()))
def test_optimizer_paths_on_shards_equal_whole(mesh1: Any, name: str) -> None:
    from diffprog.distributed import gathered, shard
    from diffprog.optim import run_step

    x, y = batch()
    make = _optimizer_paths()[name]
    ref, run = make_net(), shard(make_net(), mesh1)
    ref_opt, opt = make(ref), make(run)
    lr = torch.tensor(0.01)  # a tensor learning rate, too
    for _ in range(3):
        ref, ref_opt = run_step(ref, ref_opt, loss_of(ref, x, y), lr)
        run, opt = run_step(run, opt, loss_of(gathered(run), x, y), lr)
    _close(run, ref, "world of one")


def test_unused_parameter_is_left_alone_on_shards(mesh1: Any) -> None:
    from diffprog.distributed import gathered, shard
    from diffprog.optim import Adam, run_step

    x, y = batch()
    run = shard(make_net(), mesh1)
    opt = Adam.init(run)
    loss = torch.nn.functional.mse_loss(gathered(run).first(x).sum(-1), y)  # first only
    new, new_opt = run_step(run, opt, loss, 0.01)
    assert torch.equal(new.tiny.full_tensor(), run.tiny.full_tensor())
    assert new_opt.param_counts[2] == 0 and new_opt.param_counts[0] == 1


def test_saving_a_sharded_model_as_one_file_is_refused(mesh1: Any, tmp_path: Path) -> None:
    from diffprog.distributed import shard, unshard

    sharded = shard(make_net(), mesh1)
    for save in (
        lambda: dp.save_params(sharded, tmp_path / "m.safetensors"),
        lambda: dp.save_params(sharded, tmp_path / "m.pt"),
        lambda: dp.save_checkpoint(
            tmp_path / "c.safetensors", model=sharded, optimizer=None, step=0
        ),
    ):
        with pytest.raises(dp.SaveError, match="sharded tensor.*unshard"):
            save()
    assert not list(tmp_path.iterdir())
    dp.save_params(unshard(sharded), tmp_path / "m.safetensors")  # whole: saved


def test_every_elementwise_optimizer_is_in_the_sharded_grid() -> None:
    """An optimizer declared elementwise steps shards: the multi-process grid must cover it;
    one that is not is refused on DTensors (Adafactor, in the refusals)."""
    from diffprog import optim

    exported = {
        cls
        for cls in (getattr(optim, name) for name in optim.__all__)
        if isinstance(cls, type) and issubclass(cls, optim.PureOptimizer)
    }
    elementwise = {cls for cls in exported if cls._elementwise}
    in_grid = set()
    for made in _optimizers(make_net()).values():
        inner = made.inner if isinstance(made, optim.Chain) else made
        in_grid.add(type(inner))
    assert elementwise <= in_grid, elementwise - in_grid
    assert exported - elementwise == {optim.PureOptimizer, optim.Adafactor}


def test_value_and_grad_and_apply_gradients_on_shards(mesh1: Any) -> None:
    from torch.distributed.tensor import DTensor

    from diffprog.distributed import gathered, shard
    from diffprog.optim import RMSprop, apply_gradients, run_step, value_and_grad

    x, y = batch()
    ref, run = make_net(), shard(make_net(), mesh1)
    ref_opt, opt = RMSprop.init(ref), RMSprop.init(run)
    step = value_and_grad(lambda m, x, y: loss_of(gathered(m), x, y))
    for _ in range(3):
        ref, ref_opt = run_step(ref, ref_opt, loss_of(ref, x, y), 0.01)
        _, grads = step(run, x, y)  # the model's structure, DTensor gradients
        assert isinstance(grads.first.weight, DTensor)
        run, opt = apply_gradients(run, opt, grads, 0.01)
    _close(run, ref, "value_and_grad")


def test_sharding_needs_a_one_dimensional_mesh(mesh1: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from diffprog.distributed import shard, shard_optimizer
    from diffprog.optim import Adam

    square = init_device_mesh("cpu", (1, 1))
    with pytest.raises(dp.DiffprogError, match="1-D mesh"):
        shard(make_net(), square)
    with pytest.raises(dp.DiffprogError, match="1-D mesh"):
        shard_optimizer(Adam.init(make_net()), square)


def test_a_resave_that_fails_leaves_no_checkpoint_mixing_two_saves(
    mesh1: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffprog.distributed._shard_checkpoint as module
    from diffprog.distributed import (
        gather_checkpoint,
        latest_sharded_checkpoint,
        load_sharded_checkpoint,
        save_sharded_checkpoint,
        shard,
    )

    model = shard(make_net(), mesh1)
    other = shard(dp.map_parameters(lambda p: p + 100.0, make_net()), mesh1)
    save_sharded_checkpoint(tmp_path / "run", model=model, optimizer=None, step=3)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    # the re-save dies writing its file: the step's old marker is gone, nothing is complete
    with monkeypatch.context() as patch:
        patch.setattr(module, "save_checkpoint", crash)
        with pytest.raises(OSError, match="disk full"):
            save_sharded_checkpoint(tmp_path / "run", model=other, optimizer=None, step=3)
    assert latest_sharded_checkpoint(tmp_path / "run") is None
    # a complete folder whose rank file is another save's (of the same step) is refused
    first = save_sharded_checkpoint(tmp_path / "a", model=model, optimizer=None, step=3)
    second = save_sharded_checkpoint(tmp_path / "b", model=other, optimizer=None, step=3)
    name = "rank-00000-of-00001.safetensors"
    (first / name).write_bytes((second / name).read_bytes())
    with pytest.raises(dp.LoadError, match="another save of this step"):
        load_sharded_checkpoint(first, model=make_net(), optimizer=None, mesh=mesh1)
    with pytest.raises(dp.LoadError, match="another save of this step"):
        gather_checkpoint(first, tmp_path / "w.safetensors", model=make_net(), optimizer=None)
    # a save's own files load, its token not in the metadata handed back
    back = load_sharded_checkpoint(second, model=make_net(), optimizer=None, mesh=mesh1)
    assert back.extra == {}
    with pytest.raises(dp.DiffprogError, match="sharded_save_token"):
        save_sharded_checkpoint(
            tmp_path / "c", model=model, optimizer=None, step=1, sharded_save_token="x"
        )


def test_freeze_compile_step_and_torch_optimizer_checkpoints_refuse_sharded_models(
    mesh1: Any, tmp_path: Path
) -> None:
    from diffprog.distributed import (
        gathered,
        load_sharded_checkpoint,
        save_sharded_checkpoint,
        shard,
    )
    from diffprog.func import compile_step
    from diffprog.optim import Adam, TorchOptimizer, chain, clip_by_global_norm

    x, y = batch()
    sharded = shard(make_net(), mesh1)
    with pytest.raises(dp.DiffprogError, match="first.bias is sharded.*Freeze before shard"):
        dp.freeze(sharded, "first.bias")
    step = compile_step(lambda m, x, y: loss_of(gathered(m), x, y), 0.01, backend="eager")
    with pytest.raises(dp.DiffprogError, match="compile_step.*first.weight.*run_step"):
        step(sharded, Adam.init(sharded), x, y)
    torch_opt = TorchOptimizer.init(sharded, torch.optim.Adam, lr=0.01)
    for opt in (torch_opt, chain(clip_by_global_norm(1.0), torch_opt)):
        with pytest.raises(dp.DiffprogError, match="does not take a TorchOptimizer"):
            save_sharded_checkpoint(tmp_path, model=sharded, optimizer=opt, step=1)
    assert not list(tmp_path.iterdir())
    save_sharded_checkpoint(tmp_path, model=sharded, optimizer=None, step=1)
    skeleton = make_net()
    with pytest.raises(dp.DiffprogError, match="does not take a TorchOptimizer"):
        load_sharded_checkpoint(
            tmp_path,
            model=skeleton,
            optimizer=TorchOptimizer.init(skeleton, torch.optim.Adam, lr=0.01),
            mesh=mesh1,
        )
