"""Learning-rate schedules: values, torch.optim.lr_scheduler parity, use in every optimizer."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffprog import make_independent
from diffprog.optim import (
    ASGD,
    GD,
    Adadelta,
    Adafactor,
    Adam,
    AdamW,
    Lion,
    Rprop,
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    learning_rate_at,
    linear_schedule,
    linear_warmup_schedule,
    step_decay_schedule,
    warmup_cosine_decay_schedule,
)


def _torch_lrs(make: Any, steps: int, lr: float = 0.1) -> list[float]:
    """The learning rate torch.optim uses at each of ``steps`` steps under a scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_cosine_decay_matches_cosine_annealing_lr() -> None:
    expected = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.01), 21
    )
    s = cosine_decay_schedule(0.1, 20, alpha=0.1)
    assert [s(c) for c in range(21)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert s(100) == pytest.approx(0.01)


def test_step_decay_matches_step_lr() -> None:
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), 12)
    s = step_decay_schedule(0.1, 3, gamma=0.5)
    assert [s(c) for c in range(12)] == pytest.approx(expected, rel=1e-12)


def test_linear_warmup_matches_linear_lr() -> None:
    expected = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.LinearLR(
            o, start_factor=0.25, end_factor=1.0, total_iters=6
        ),
        10,
    )
    s = linear_warmup_schedule(0.1, 6, init_value=0.025)
    assert [s(c) for c in range(10)] == pytest.approx(expected, rel=1e-12)


def test_linear_schedule_with_a_late_start() -> None:
    s = linear_schedule(1.0, 3.0, 2, transition_begin=2)
    assert [s(c) for c in range(6)] == [1.0, 1.0, 1.0, 2.0, 3.0, 3.0]
    jump = linear_schedule(1.0, 0.0, 0, transition_begin=3)
    assert [jump(c) for c in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_join_restarts_each_schedule_at_its_boundary() -> None:
    s = join_schedules(
        [constant_schedule(1.0), step_decay_schedule(1.0, 2, 0.5), constant_schedule(7.0)], [2, 6]
    )
    assert [s(c) for c in range(8)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 7.0, 7.0]


def test_warmup_cosine_decay_is_warmup_joined_to_cosine() -> None:
    s = warmup_cosine_decay_schedule(0.0, 1.0, 4, 14, end_value=0.1)
    assert [s(c) for c in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(14) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)


@given(init=st.floats(1e-5, 1.0), steps=st.integers(1, 500), count=st.integers(0, 2000))
def test_cosine_decay_stays_between_its_ends(init: float, steps: int, count: int) -> None:
    s = cosine_decay_schedule(init, steps, alpha=0.1)
    assert 0.1 * init * (1 - 1e-12) <= s(count) <= init * (1 + 1e-12)


@given(steps=st.integers(1, 50), count=st.integers(0, 200))
def test_warmup_is_monotone(steps: int, count: int) -> None:
    s = linear_warmup_schedule(1.0, steps)
    assert s(count) <= s(count + 1) <= 1.0


def test_schedules_print_and_pickle() -> None:
    s = warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
    assert "CosineDecaySchedule(init_value=0.001, decay_steps=90" in repr(s)
    assert pickle.loads(pickle.dumps(s)) == s


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cosine_decay_schedule(1.0, 0), "decay_steps"),
        (lambda: step_decay_schedule(1.0, 0), "step_size"),
        (lambda: linear_schedule(1.0, 0.0, -1), "transition_steps"),
        (lambda: join_schedules([constant_schedule(1.0)], [3]), "one boundary fewer"),
        (
            lambda: join_schedules([constant_schedule(1.0)] * 3, [5, 2]),
            "boundaries must increase",
        ),
        (lambda: warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), "counts the warm-up"),
    ],
)
def test_bad_schedules_are_refused(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_learning_rate_at_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="schedule"):
        learning_rate_at("0.1", 0)  # type: ignore[arg-type]


def test_adam_with_a_schedule_matches_torch_with_a_scheduler() -> None:
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
    grads = [
        [torch.randn_like(p) for p in init] for _ in range(51)
    ]  # CosineAnnealingLR rises after T_max
    ps = [torch.nn.Parameter(p.clone()) for p in init]
    topt = torch.optim.AdamW(ps, lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=50, eta_min=0.001)
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        topt.step()
        scheduler.step()
    ours = [make_independent(p.clone()) for p in init]
    opt = AdamW.init(ours)
    schedule = cosine_decay_schedule(0.01, 50, alpha=0.1)
    for gs in grads:
        new, opt = opt.step(schedule, gs, ours)
        ours = [make_independent(p) for p in new]
    torch.testing.assert_close([p.detach() for p in ours], [p.detach() for p in ps])


@pytest.mark.parametrize(
    "opt",
    [GD(), Adam(), Lion(), Adadelta(), Rprop(), ASGD(), Adafactor()],
    ids=["GD", "Adam", "Lion", "Adadelta", "Rprop", "ASGD", "Adafactor"],
)
def test_every_optimizer_feeds_its_count_to_the_schedule(opt: Any) -> None:
    seen: list[int] = []

    def schedule(count: int) -> float:
        seen.append(count)
        return 0.1

    params = [make_independent(torch.ones(2))]
    for _ in range(4):
        new, opt = opt.step(schedule, [torch.ones(2)], params)
        params = [make_independent(p) for p in new]
    assert seen == [0, 1, 2, 3] and opt.count == 4


def test_gd_with_a_schedule_equals_gd_with_those_rates() -> None:
    schedule = step_decay_schedule(0.5, 2, 0.1)
    p_sched = [make_independent(torch.zeros(1))]
    p_fixed = [make_independent(torch.zeros(1))]
    opt = GD()
    for count in range(5):
        new, opt = opt.step(schedule, [torch.ones(1)], p_sched)
        p_sched = [make_independent(p) for p in new]
        fixed, _ = GD().step(schedule(count), [torch.ones(1)], p_fixed)
        p_fixed = [make_independent(p) for p in fixed]
    torch.testing.assert_close(p_sched, p_fixed)
