"""Data-parallel training in real processes (gloo over loopback): tests/distributed_workers.py.

Two and three processes train every case of the grid; all ranks must end identical, and equal
(to float32 tolerance) to one process on the concatenated batches. Checkpoints written by two
ranks resume on three. A rank that dies makes the others raise a ``CollectiveError`` within the
group's timeout, and the last checkpoint stays loadable.
"""

from __future__ import annotations

import multiprocessing
import pathlib
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
import distributed_workers as w
from diffprog.distributed import (
    CollectiveError,
    DataParallel,
    broadcast_model,
    load_checkpoint,
    save_checkpoint,
    sync_tensors,
)
from diffprog.distributed import _broadcast as dist_broadcast
from diffprog.distributed import _checkpoint as dist_checkpoint
from diffprog.distributed._collective import control_device, group_devices
from diffprog.distributed._reducer import Reducer
from diffprog.nn import EmbeddingSpec, LinearSpec
from diffprog.optim import (
    GD,
    Adam,
    ClipGradNorm,
    NothingToTrainError,
    apply_gradients,
    chain,
    clip_by_global_norm,
    run_step,
    step,
)

LIMIT = 120.0  # seconds a group of processes may take before the test kills it


def launch(world: int, folder: pathlib.Path, jobs: list[str]) -> list[int | None]:
    """Run ``worker`` in ``world`` fresh processes; their exit codes (None: killed)."""
    # A fork server: torch and diffprog are imported once, in a process without threads, and
    # each rank is forked from it (spawning each would import torch again: seconds per rank).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["distributed_workers"])
    processes = [
        context.Process(target=w.worker, args=(rank, world, str(folder), jobs))
        for rank in range(world)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(LIMIT)
    codes = []
    for p in processes:
        if p.is_alive():  # never hang the suite
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def errors(folder: pathlib.Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("error-rank*.txt")))


def check_grid(folder: pathlib.Path, world: int) -> None:
    ranks = [torch.load(folder / f"grid-rank{r}.pt") for r in range(world)]
    for case in w.CASES:
        got = ranks[0][case.name]
        for r in range(1, world):  # the ranks stay identical, bit for bit
            other = ranks[r][case.name]
            assert got.keys() == other.keys()
            for path, t in got.items():
                assert torch.equal(t, other[path]), (case.name, r, path)
        expected = w.values(w.reference(case, world))
        assert got.keys() == expected.keys(), case.name
        for path, t in got.items():
            torch.testing.assert_close(
                t, expected[path], rtol=1e-5, atol=1e-6, msg=f"{case.name}: {path}"
            )
        if case.bn is None:
            assert ranks[0][case.name + ":tie"] is True  # the tie survived the steps
            start = w.values(w.initial(case, seed=0))
            reached = not torch.equal(got["unused.weight"], start["unused.weight"])
            assert reached == case.branch  # only rank 0 reached it, or no rank did
            assert torch.equal(got["frozen.weight"], start["frozen.weight"])
            assert not torch.equal(got["enc.weight"], start["enc.weight"])


def test_two_ranks_train_like_one_process_resume_a_checkpoint_and_refuse_unequal_models(
    tmp_path: pathlib.Path,
) -> None:
    for name in w.RESUMED:  # saved by one process after 2 steps, resumed by two
        case = next(c for c in w.CASES if c.name == name)
        model = w.initial(case, seed=0)
        opt = case.make(model)
        for n in range(2):
            x, y = w.batch(n)
            model, opt = run_step(model, opt, w.mse(model, x, y), case.lr)
        dp.save_checkpoint(tmp_path / f"{name}.safetensors", model=model, optimizer=opt, step=2)
    assert launch(2, tmp_path, ["grid", "resume", "diverge"]) == [0, 0], errors(tmp_path)
    check_grid(tmp_path, 2)
    for r in range(2):  # models not broadcast: refused on every rank at the first step
        for name in ("diverge", "diverge-frozen"):  # the frozen tensors count too
            said = (tmp_path / f"{name}-rank{r}.txt").read_text()
            assert "Call model = broadcast_model(model)" in said
    for name in w.RESUMED:
        case = next(c for c in w.CASES if c.name == name)
        expected = w.values(w.reference(case, world=2))
        for r in range(2):
            got = torch.load(tmp_path / f"resume-rank{r}.pt")[name]
            for path, t in got.items():
                torch.testing.assert_close(t, expected[path], rtol=1e-5, atol=1e-6, msg=path)


def test_three_ranks_train_like_one_process_and_a_rank_that_hangs_or_dies_fails_the_others(
    tmp_path: pathlib.Path,
) -> None:
    codes = launch(3, tmp_path, ["grid", "hang", "die"])
    assert codes == [0, 0, 3], (codes, errors(tmp_path))  # none killed by the test: no hang
    check_grid(tmp_path, 3)
    for r in range(2):  # a rank that hangs: the others raise at the group's timeout
        seconds, message = (tmp_path / f"hang-rank{r}.txt").read_text().split("\n", 1)
        assert float(seconds) < w.HANG_TIMEOUT.total_seconds() + 10
        assert f"on rank {r} of 3" in message and "timeout" in message
    for r in range(2):
        seconds, message = (tmp_path / f"die-rank{r}.txt").read_text().split("\n", 1)
        assert float(seconds) < w.TIMEOUT.total_seconds() + 10
        assert f"on rank {r} of 3" in message and "restart from the last checkpoint" in message
    # Written by rank 0 of 3 (crash-safe), loaded by one process.
    latest = dp.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "die-3.safetensors"
    case = next(c for c in w.CASES if c.name == "adam")
    skeleton = w.initial(case, seed=5)
    loaded = dp.load_checkpoint(latest, model=skeleton, optimizer=case.make(skeleton))
    assert loaded.step == 3
    expected = w.values(w.reference(case, world=3, steps=3))
    for path, t in w.values(loaded.model).items():
        torch.testing.assert_close(t, expected[path], rtol=1e-5, atol=1e-6, msg=path)


# --- in this process: a group of one ---------------------------------------------------------


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_buckets_are_launched_during_the_backward_pass(group_of_one: None) -> None:
    model = dp.sample(LinearSpec(64, 64), generator=torch.Generator().manual_seed(0))
    params = dp.flatten_parameters(model)
    reducer = Reducer(params, [None, None], 1.0, cap_bytes=1, group=None)
    assert len(reducer.buckets) == 2  # one per parameter at this cap
    loss = model(torch.ones(3, 64)).sum()
    with reducer.hooked():
        grads = torch.autograd.grad(loss, params)
        launched = reducer.next  # before finish: the hooks launched it
    # The bias's bucket, filled first, went during the backward pass; the last one carries the
    # flags too, which finish writes.
    assert launched == 1 and reducer.buckets[0].positions == [1]
    reduced = reducer.finish(torch.zeros(()))
    for g, r in zip(grads, reduced.grads, strict=True):
        assert r is not None and torch.equal(g, r)
    assert not params[0]._backward_hooks  # the hooks are gone


@settings(deadline=None, max_examples=40)  # a process group per example: some ms
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.sampled_from(["f32", "f64", "c64"])),
        min_size=1,
        max_size=8,
    ),
    cap=st.integers(1, 200),
    reached=st.lists(st.booleans(), min_size=8, max_size=8),
    pending=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_every_gradient_lands_once_scaled_whatever_the_buckets(
    shapes: list[tuple[int, int, str]], cap: int, reached: list[bool], pending: list[bool]
) -> None:
    dtypes = {"f32": torch.float32, "f64": torch.float64, "c64": torch.complex64}
    g = torch.Generator().manual_seed(len(shapes) * 1000 + cap)
    ps = [torch.zeros(a, b, dtype=dtypes[d]) for a, b, d in shapes]
    grads = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in ps]
    before = [
        torch.randn(p.shape, dtype=p.dtype, generator=g) if pending[i] else None
        for i, p in enumerate(ps)
    ]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        reducer = Reducer(ps, before, 0.25, cap_bytes=cap, group=None)
        assert sorted(i for b in reducer.buckets for i in b.positions) == list(range(len(ps)))
        for b in reducer.buckets:  # one dtype per bucket, closed once it reaches the cap
            assert len({ps[i].dtype for i in b.positions}) == 1
            sizes = [ps[i].numel() * ps[i].element_size() for i in b.positions]
            assert sum(sizes[:-1]) < cap
        for i in reversed(range(len(ps))):
            if reached[i]:
                reducer.put(i, grads[i])
        out = reducer.finish(torch.zeros(()))
    finally:
        dist.destroy_process_group()
    for i in range(len(ps)):
        parts = [t for t in (grads[i] if reached[i] else None, before[i]) if t is not None]
        if not parts:
            assert out.grads[i] is None
        else:
            torch.testing.assert_close(out.grads[i], sum(parts) * 0.25)


def test_one_bucket_per_dtype_and_cap(group_of_one: None) -> None:
    ps = [torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(10), torch.zeros(30)]
    reducer = Reducer(ps, [None] * 4, 1.0, cap_bytes=80, group=None)
    # Reverse order: [30 f32] fills a bucket; [10 f32, 10 f32] the next; [10 f64] its own.
    assert [b.positions for b in reducer.buckets] == [[3], [2, 0], [1]]


def test_complex_parameters_and_their_flags_in_a_collective_of_their_own(
    group_of_one: None,
) -> None:
    ps = [
        dp.make_independent(torch.ones(2, dtype=torch.cfloat)),
        dp.make_independent(torch.ones(2)),
    ]
    reducer = Reducer(ps, [None, None], 0.5, cap_bytes=1, group=None)
    assert reducer.meta is None  # the last bucket is complex: the flags go on their own
    reducer.put(0, torch.tensor([1 + 2j, 3j]))
    reduced = reducer.finish(torch.ones(()))
    assert reduced.grads[1] is None and reduced.bad_loss_ranks == [0]
    assert torch.equal(reduced.grads[0], torch.tensor([0.5 + 1j, 1.5j]))


def test_data_parallel_leaves_its_inputs_unchanged_and_accumulates_as_a_value(
    group_of_one: None,
) -> None:
    model = dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
    before = w.values(model)
    opt = DataParallel(Adam.init(model), accumulate=3)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    losses = [model(x[2 * k : 2 * k + 2]).pow(2).mean() for k in range(3)]
    m1, o1 = run_step(model, opt, losses[0], 0.1)
    m2, o2 = run_step(m1, o1, losses[1], 0.1)
    assert m2 is model and (o1.micro, o2.micro, opt.micro) == (1, 2, 0) and not opt.pending
    m3, o3 = run_step(m2, o2, losses[2], 0.1)
    assert o3.micro == 0 and o3.count == 1 and o2.micro == 2  # o2 still a valid window
    expected, _ = run_step(model, Adam.init(model), model(x).pow(2).mean(), 0.1)
    torch.testing.assert_close(m3.weight, expected.weight)
    assert all(torch.equal(t, before[p]) for p, t in w.values(model).items())
    # apply_gradients goes through the same window.
    g = [torch.ones(2, 3), None]
    a1, p1 = apply_gradients(model, DataParallel(GD(), accumulate=2), g, 1.0)
    a2, _ = apply_gradients(a1, p1, g, 1.0)
    assert a1 is model and torch.equal(a2.weight, model.weight - 1.0)
    assert torch.equal(a2.bias, model.bias)  # None on every micro-batch: left alone


def test_a_sparse_gradient_is_averaged_dense(group_of_one: None) -> None:
    table = dp.sample(EmbeddingSpec(5, 2, sparse=True), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([1, 3, 3])
    new, _ = run_step(table, DataParallel(GD()), table(index).sum(), 0.5)
    expected, _ = run_step(table, GD(), table(index).sum(), 0.5)
    assert torch.equal(new.weight, expected.weight)


def test_the_protocol_step_averages_and_accumulates(group_of_one: None) -> None:
    p = [dp.make_independent(torch.zeros(3)), dp.make_independent(torch.ones(2))]
    g = [torch.tensor([1.0, 2.0, 3.0]), torch.ones(2)]
    new, opt = step(0.5, g, p, DataParallel(GD(), accumulate=2))
    assert new[0] is p[0] and opt.micro == 1
    new, opt = step(0.5, g, p, opt, used=[True, False])  # the first window's g counts
    assert torch.equal(new[0], -0.5 * g[0]) and torch.equal(new[1], p[1] - 0.25)
    assert opt.micro == 0 and opt.count == 1


def test_nonfinite_loss_is_judged_for_the_whole_window(group_of_one: None) -> None:
    model = dp.sample(LinearSpec(3, 1), generator=torch.Generator().manual_seed(0))
    opt = DataParallel(GD(), accumulate=2)

    def bad() -> torch.Tensor:
        return model(torch.ones(1, 3)).sum() * float("inf")

    def good() -> torch.Tensor:
        return model(torch.ones(1, 3)).sum()

    m1, o1 = run_step(model, opt, bad(), 0.1)  # no raise yet: the ranks decide together
    with pytest.raises(dp.DiffprogError, match="non-finite"):
        run_step(m1, o1, good(), 0.1)
    m1, o1 = run_step(model, opt, bad(), 0.1, on_nonfinite="skip")
    m2, o2 = run_step(m1, o1, good(), 0.1, on_nonfinite="skip")
    assert m2 is model and o2.micro == 0 and o2.count == 0


def test_refusals(group_of_one: None) -> None:
    model = dp.sample(LinearSpec(3, 1))
    with pytest.raises(dp.DiffprogError, match="differentiable"):
        DataParallel(GD(differentiable=True))
    with pytest.raises(TypeError, match="optimizer value"):
        DataParallel(Adam)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="accumulate"):
        DataParallel(GD(), accumulate=0)
    with pytest.raises(dp.DiffprogError, match="closure"):
        run_step(model, DataParallel(GD()), lambda: model(torch.ones(1, 3)).sum(), 0.1)
    with torch.no_grad():
        loss = model(torch.ones(1, 3)).sum()
    with pytest.raises(dp.DiffprogError, match="none of the parameters"):
        run_step(model, DataParallel(GD()), loss, 0.1)
    frozen = dp.freeze(model)
    with pytest.raises(NothingToTrainError):
        run_step(frozen, DataParallel(GD()), frozen(torch.ones(1, 3)).sum(), 0.1)
    with pytest.raises(NothingToTrainError):
        apply_gradients(frozen, DataParallel(GD()), [], 0.1)
    mid = DataParallel(GD(), accumulate=2)
    _, mid = run_step(model, mid, model(torch.ones(1, 3)).sum(), 0.1)
    with pytest.raises(dp.DiffprogError, match="accumulation window"):
        save_checkpoint("x.safetensors", model=model, optimizer=mid, step=0)


def test_sync_tensors_average_and_broadcast_model_keeps_ties(group_of_one: None) -> None:
    t = [torch.tensor([1.0, 2.0]), torch.tensor([3], dtype=torch.int64), torch.tensor([True])]
    out = sync_tensors(t, "average")
    assert all(torch.equal(a, b) for a, b in zip(out, t, strict=True))
    model = w.tied_model(0)
    new = broadcast_model(model)
    assert new.dec.weight is new.enc.weight and new.enc.weight is not model.enc.weight
    assert isinstance(new.enc.weight, dp.Parameter) and new.enc.weight.is_leaf
    assert isinstance(new.frozen.weight, dp.Frozen)


def test_without_a_process_group_the_error_says_what_to_do() -> None:
    model = dp.sample(LinearSpec(3, 1))
    with pytest.raises(dp.DiffprogError, match="init_process_group"):
        broadcast_model(model)
    with pytest.raises(dp.DiffprogError, match="init_process_group"):
        run_step(model, DataParallel(GD()), model(torch.ones(1, 3)).sum(), 0.1)


def test_collective_error_names_what_failed() -> None:
    e = CollectiveError("the all-reduce of gradient bucket 1 (of 3)", 0, 2, RuntimeError("boom"))
    assert "bucket 1 (of 3) failed on rank 0 of 2: RuntimeError: boom" in str(e)


# --- review findings (issue 13) --------------------------------------------------------------


def test_the_window_holds_a_copy_of_the_callers_gradients(group_of_one: None) -> None:
    model = dp.sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
    params = dp.flatten_parameters(model)
    # apply_gradients with a buffer the caller reuses (written in place per micro-batch) ...
    buf = [torch.zeros(1, 2), torch.zeros(1)]
    new, opt = model, DataParallel(GD(), accumulate=2)
    for value in (1.0, 3.0):
        for b in buf:
            b.fill_(value)
        new, opt = apply_gradients(new, opt, buf, 1.0)
    assert torch.equal(new.weight, model.weight - 2.0) and torch.equal(new.bias, model.bias - 2.0)
    # ... and the protocol's step, the same.
    buf = [torch.zeros(1, 2), torch.zeros(1)]
    got, popt = params, DataParallel(GD(), accumulate=2)
    for value in (1.0, 3.0):
        for b in buf:
            b.fill_(value)
        got, popt = step(1.0, buf, got, popt)
    assert torch.equal(got[0], params[0] - 2.0) and torch.equal(got[1], params[1] - 2.0)


def test_data_parallel_inside_a_gradient_transform_is_refused() -> None:
    with pytest.raises(dp.DiffprogError, match=r"outermost: DataParallel\(chain\(\.\.\.\)\)"):
        chain(clip_by_global_norm(1.0), DataParallel(GD()))
    with pytest.raises(dp.DiffprogError, match=r"outermost: DataParallel\(chain\(\.\.\.\)\)"):
        ClipGradNorm(DataParallel(GD()), max_norm=1.0)
    with pytest.raises(dp.DiffprogError, match="ClipGradNorm cannot wrap DataParallel"):
        ClipGradNorm(inner=DataParallel(GD()), max_norm=1.0)
    DataParallel(chain(clip_by_global_norm(1.0), GD()))  # the right order
    DataParallel(ClipGradNorm(GD(), max_norm=1.0))


@pytest.fixture
def group_serving_cuda_only():
    """A group whose backend serves only CUDA tensors, like NCCL ("cuda:gloo": no GPU needed)."""
    dist.init_process_group("cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_control_tensors_go_to_a_device_the_group_serves(
    group_serving_cuda_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert group_devices(None) == ["cuda"]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert control_device(None) == torch.device("cuda", 3)


def test_control_tensors_stay_on_the_cpu_where_the_group_serves_it(group_of_one: None) -> None:
    assert control_device(None) == torch.device("cpu")
    dist.destroy_process_group()
    dist.init_process_group("cpu:gloo,cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert group_devices(None) == ["cpu", "cuda"] and control_device(None) == torch.device("cpu")


def test_checks_and_barriers_use_the_control_device(
    group_of_one: None, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    for module in (dist_broadcast, dist_checkpoint):
        name = module.__name__.rsplit(".", 1)[1]

        def chosen(group: object, name: str = name) -> torch.device:
            asked.append(name)
            return torch.device("cpu")

        monkeypatch.setattr(module, "control_device", chosen)
    model = broadcast_model(dp.sample(LinearSpec(2, 1)))  # the structure check
    run_step(model, DataParallel(GD()), model(torch.ones(1, 2)).sum(), 0.1)  # the replica check
    path = save_checkpoint(tmp_path / "a.safetensors", model=model, optimizer=None, step=1)
    load_checkpoint(path, model=model, optimizer=None)
    assert asked == ["_broadcast", "_broadcast", "_checkpoint", "_checkpoint"]


def test_a_collective_the_backend_refuses_to_start_is_not_blamed_on_a_dead_rank(
    group_serving_cuda_only: None,
) -> None:
    with pytest.raises(CollectiveError, match="could not be started on rank 0 of 1") as caught:
        sync_tensors([torch.ones(2)], "average")  # CPU tensors, a group serving only CUDA
    assert caught.value.stage == "start" and "probably died" not in str(caught.value)
    assert "NCCL group takes only CUDA tensors" in str(caught.value)


class _Twice(torch.autograd.Function):
    """``x * b.sum()``, whose backward differentiates ``b`` itself (its hook runs again)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, b)
        return x * b.sum()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, b = ctx.saved_tensors
        with torch.enable_grad():
            torch.autograd.grad((b**2).sum(), b)
        return g * b.sum(), (g * x).sum() * torch.ones_like(b)


def test_a_gradient_that_lands_twice_is_refused_with_its_path(group_of_one: None) -> None:
    model = {
        "a": dp.make_independent(torch.tensor([1.0, 2.0])),
        "c": dp.make_independent(torch.tensor([3.0, 1.0])),
    }
    loss = (_Twice.apply(torch.tensor([1.0, 2.0]), model["c"]) * model["a"]).sum()
    with pytest.raises(dp.DiffprogError, match="gradient of parameter 'c' arrived twice"):
        run_step(model, DataParallel(GD(), bucket_cap_mb=1e-6), loss, 1.0)
    assert not model["c"]._backward_hooks and not model["a"]._backward_hooks
    ps = [torch.zeros(2), torch.zeros(3)]
    reducer = Reducer(ps, [None, None], 1.0, cap_bytes=1, group=None)
    reducer.put(1, torch.ones(3))
    with pytest.raises(dp.DiffprogError, match="parameter 1 arrived twice"):
        reducer.put(1, torch.ones(3))


def test_a_parameter_that_does_not_require_grad_is_not_reached(group_of_one: None) -> None:
    model = dp.sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
    model.bias.requires_grad_(False)
    x = torch.ones(1, 2)
    expected, _ = run_step(model, GD(), model(x).sum(), 0.1)
    new, _ = run_step(model, DataParallel(GD()), model(x).sum(), 0.1)
    assert torch.equal(new.weight, expected.weight) and torch.equal(new.bias, model.bias)
    m1, o1 = run_step(model, DataParallel(GD(), accumulate=2), model(x).sum(), 0.1)
    m2, _ = run_step(m1, o1, model(x).sum(), 0.1)
    assert torch.equal(m2.weight, expected.weight) and torch.equal(m2.bias, model.bias)
    assert not model.weight._backward_hooks and not model.bias._backward_hooks


def test_saving_a_data_parallel_with_the_plain_checkpoint_points_to_the_distributed_one(
    tmp_path: pathlib.Path,
) -> None:
    model = dp.sample(LinearSpec(2, 2), generator=torch.Generator().manual_seed(0))
    optimizer = DataParallel(Adam.init(model))
    with pytest.raises(dp.SaveError, match=r"diffprog\.distributed\.save_checkpoint"):
        dp.save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=optimizer, step=0)
    assert not list(tmp_path.iterdir())  # nothing written
