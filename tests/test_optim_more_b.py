"""Issue 9, the rest of torch.optim (part b): pure ``Adadelta``, ``Rprop``, ``ASGD`` and
``Adafactor`` against torch.optim itself.

The grid runs each optimizer, with each set of options torch has, along each path a step can
take (``step`` called directly, ``run_step``, donated state, per-parameter overrides with a
frozen parameter, parameters the loss does not reach in some steps, gradients and parameters
in other memory layouts) for up to 100 steps; the reference is the torch.optim optimizer with
the same options and the same gradients. ``ASGD`` and ``Adafactor`` round as torch's path
chosen by ``foreach`` does (torch's for-loop and multi-tensor paths differ there), so both
values of ``foreach`` are in the grid and must be bit-identical to torch with the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog.optim
from diffprog import make_independent
from diffprog.optim import ASGD, Adadelta, Adafactor, Rprop, run_step

SHAPES: list[tuple[int, ...]] = [(3, 4), (5,), (2, 3, 4), (), (1, 6)]
FROZEN = 1  # the parameter frozen on the "groups" path
SCALED = 0  # the parameter with its own settings on the "groups" path


# (id, our class, options for both, learning rate, the override of parameter SCALED)
CASES: list[tuple[str, Any, dict[str, Any], float, dict[str, Any]]] = [
    ("Adadelta", Adadelta, {}, 1.0, {"rho": 0.7}),
    (
        "Adadelta-all",
        Adadelta,
        {"rho": 0.5, "eps": 1e-4, "weight_decay": 0.1, "maximize": True, "foreach": True},
        0.5,
        {"eps": 1e-3, "weight_decay": 0.0},
    ),
    ("Adadelta-rho1", Adadelta, {"rho": 1.0, "foreach": False}, 0.1, {"rho": 0.0}),
    ("Rprop", Rprop, {}, 0.01, {"etas": (0.4, 1.1)}),
    (
        "Rprop-all",
        Rprop,
        {"etas": (0.3, 1.5), "step_sizes": (1e-3, 0.1), "maximize": True, "foreach": True},
        0.05,
        {"step_sizes": (0.0, 1.0)},
    ),
    ("ASGD", ASGD, {}, 0.01, {"t0": 3.0}),
    (
        "ASGD-all-loop",
        ASGD,
        {
            "lambd": 0.01,
            "alpha": 0.5,
            "t0": 10.0,
            "weight_decay": 0.1,
            "maximize": True,
            "foreach": False,
        },
        0.05,
        {"lambd": 0.1, "alpha": 1.0},
    ),
    (
        "ASGD-all-foreach",
        ASGD,
        {"lambd": 0.01, "alpha": 0.5, "t0": 10.0, "weight_decay": 0.1, "foreach": True},
        0.05,
        {"t0": 0.0, "weight_decay": 0.0},
    ),
    ("Adafactor", Adafactor, {}, 0.01, {"beta2_decay": -0.5}),
    (
        "Adafactor-all-loop",
        Adafactor,
        {
            "beta2_decay": -0.5,
            "eps": (1e-20, 1e-2),
            "d": 1.5,
            "weight_decay": 0.1,
            "maximize": True,
            "foreach": False,
        },
        0.05,
        {"eps": (None, 0.0), "d": 1.0},
    ),
    (
        "Adafactor-all-foreach",
        Adafactor,
        {"eps": (None, 0.1), "d": 1.2, "weight_decay": 0.2, "maximize": True, "foreach": True},
        1.0,
        {"weight_decay": 0.0, "beta2_decay": -1.0},
    ),
]
CASE_IDS = [c[0] for c in CASES]

# path: number of steps (fewer where a step costs more: autograd, many groups)
PATHS = {"step": 100, "run_step": 30, "donate": 100, "groups": 50, "unused": 100, "layouts": 40}

#: torch.optim classes of ours, and our options torch.optim's constructor does not take
TORCH = {
    Adadelta: torch.optim.Adadelta,
    Rprop: torch.optim.Rprop,
    ASGD: torch.optim.ASGD,
    Adafactor: torch.optim.Adafactor,
}


def _start(layouts: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    if layouts:  # transposed, and every other column of a larger tensor
        params[0] = torch.randn(4, 3, generator=gen).t()
        params[2] = torch.randn(2, 3, 8, generator=gen)[..., ::2]
    return params


def _gradients(path: str, steps: int) -> list[list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(1)
    out: list[list[torch.Tensor | None]] = []
    for s in range(steps):
        grads: list[torch.Tensor | None] = [torch.randn(shape, generator=gen) for shape in SHAPES]
        if path == "layouts":
            grads[0] = torch.randn(4, 3, generator=gen).t()  # transposed
            grads[1] = torch.randn((), generator=gen).expand(5)  # stride 0, as of a sum
            grads[2] = torch.randn(2, 3, 8, generator=gen)[..., ::2]  # sliced
            grads[4] = torch.randn(6, 1, generator=gen).t()
        if path == "unused":
            # parameter 3 is first used at step 4; then every parameter now and then
            for i in range(len(grads)):
                if (s < 3 and i == 3) or (s + i) % (i + 2) == 0:
                    grads[i] = None
        out.append(grads)
    return out


def _learning_rate(path: str, lr: float) -> Callable[[int], float] | float:
    """A schedule on the "unused" path: a parameter first used late must start from the
    learning rate of its first step (Rprop's step size, ASGD's eta), as in torch.optim."""
    if path == "unused":
        return lambda count: lr / (1 + 0.1 * count)
    return lr


class _Inject(torch.autograd.Function):
    """A zero loss term whose gradient with respect to ``p`` is ``g`` (its layout kept)."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.g = g
        return p.new_zeros(())

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> Any:  # type: ignore[override]
        return ctx.g, None


def _ours(
    cls: Any,
    options: dict[str, Any],
    lr: float,
    override: dict[str, Any],
    path: str,
    steps: list[list[torch.Tensor | None]],
) -> tuple[list[torch.Tensor], Any]:
    params = [make_independent(p) for p in _start(path == "layouts")]
    extra: dict[str, Any] = {}
    if path == "donate":
        extra["donate"] = True
    if path == "groups":
        extra = {"overrides": {str(SCALED): {"lr_scale": 0.5, **override}}, "freeze": str(FROZEN)}
    opt = cls.init(params, **options, **extra)
    rate = _learning_rate(path, lr)
    for grads in steps:
        used = [g is not None for g in grads]
        if path == "run_step":
            loss = sum(
                (_Inject.apply(p, g) for p, g in zip(params, grads, strict=True)), torch.zeros(())
            )
            params, opt = run_step(params, opt, loss, rate)
            continue
        new, opt = opt.step(rate, grads, params, used=None if all(used) else used)
        params = [make_independent(p) for p in new]
    return [p.detach() for p in params], opt


def _theirs(
    cls: Any,
    options: dict[str, Any],
    lr: float,
    override: dict[str, Any],
    path: str,
    steps: list[list[torch.Tensor | None]],
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = [torch.nn.Parameter(p.clone()) for p in _start(path == "layouts")]
    groups: list[dict[str, Any]] = [{"params": params}]
    if path == "groups":
        groups = [
            {"params": [params[SCALED]], "lr": lr * 0.5, **override},
            {"params": [p for i, p in enumerate(params) if i not in (SCALED, FROZEN)]},
        ]
    opt = TORCH[cls](groups, lr=lr, **options)
    rate = _learning_rate(path, lr)
    for count, grads in enumerate(steps):
        if callable(rate):
            for group in opt.param_groups:
                group["lr"] = rate(count)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("name", "cls", "options", "lr", "override"), CASES, ids=CASE_IDS)
def test_matches_torch_optim_on_every_path(
    name: str,
    cls: Any,
    options: dict[str, Any],
    lr: float,
    override: dict[str, Any],
    path: str,
) -> None:
    steps = _gradients(path, PATHS[path])
    reference, topt = _theirs(cls, options, lr, override, path, steps)
    got, opt = _ours(cls, options, lr, override, path, steps)
    torch.testing.assert_close(got, [p.detach() for p in reference], rtol=0, atol=0)
    # torch's per-parameter state["step"] is our param_counts (count while all alike)
    trained = [i for i in range(len(SHAPES)) if path != "groups" or i != FROZEN]
    counts = [opt.param_counts[i] if opt.param_counts else opt.count for i in trained]
    assert counts == [int(topt.state[reference[i]]["step"]) for i in trained]
    if path == "unused":
        assert opt.param_counts[3] < opt.count  # the grid did leave parameters unused


# --- torch's two paths, and which options change the numbers ---------------------------------


def _torch_only(cls: Any, options: dict[str, Any], lr: float, steps: int) -> list[torch.Tensor]:
    reference, _ = _theirs(cls, options, lr, {}, "step", _gradients("step", steps))
    return [p.detach() for p in reference]


@pytest.mark.parametrize("cls", [Adadelta, Rprop, ASGD, Adafactor], ids=lambda c: c.__name__)
def test_foreach_changes_the_numbers_exactly_where_torch_s_paths_round_differently(
    cls: Any,
) -> None:
    # Why ASGD and Adafactor keep ``foreach`` as a setting and the others ignore it: torch's
    # for-loop and multi-tensor paths agree bit for bit for Adadelta and Rprop, and only to
    # float32 tolerance for ASGD and Adafactor (the grid above matches each path exactly).
    options = {"weight_decay": 0.1} if cls is not Rprop else {}
    loop = _torch_only(cls, {**options, "foreach": False}, 0.05, 100)
    multi = _torch_only(cls, {**options, "foreach": True}, 0.05, 100)
    torch.testing.assert_close(multi, loop)
    differ = any(not torch.equal(a, b) for a, b in zip(loop, multi, strict=True))
    assert differ == (cls in (ASGD, Adafactor))
    # a setting (declared with hyper(), kept in the value) there; an ignored torch option here
    settings = [f.name for f in cls.declaration().hyper]
    assert ("foreach" in settings) == differ
    assert ("foreach" in cls.declaration().torch_options) == (not differ)


@pytest.mark.parametrize(
    ("cls", "flags"),
    [
        (Adadelta, {"foreach": True, "capturable": True, "differentiable": False}),
        (Rprop, {"foreach": False, "capturable": True, "differentiable": False}),
        (ASGD, {"capturable": True, "differentiable": False}),
        (Adafactor, {"foreach": None}),
    ],
    ids=["Adadelta", "Rprop", "ASGD", "Adafactor"],
)
def test_torch_s_execution_flags_are_accepted_and_change_nothing(
    cls: Any, flags: dict[str, Any]
) -> None:
    steps = _gradients("step", 10)
    plain, _ = _ours(cls, {}, 0.05, {}, "step", steps)
    flagged, _ = _ours(cls, flags, 0.05, {}, "step", steps)
    torch.testing.assert_close(flagged, plain, rtol=0, atol=0)
    TORCH[cls]([torch.nn.Parameter(torch.zeros(2))], **flags)  # torch takes them too


@pytest.mark.parametrize("cls", [Adadelta, Rprop, ASGD], ids=lambda c: c.__name__)
def test_differentiable_steps_are_taken(cls: Any) -> None:  # tests/test_optim_differentiable.py
    assert cls.init([make_independent(torch.zeros(2))], differentiable=True).differentiable


# --- state, as torch.optim keeps it -----------------------------------------------------------

STATE = [
    (Adadelta, {"weight_decay": 0.1}, ["square_avg", "acc_delta"]),
    (Rprop, {"maximize": True}, ["prev", "step_size"]),
    (ASGD, {"t0": 5.0}, ["ax", "eta", "mu"]),
    (ASGD, {"t0": 5.0, "foreach": True}, ["ax", "eta", "mu"]),
    (Adafactor, {"weight_decay": 0.1}, ["row_var", "col_var", "variance"]),
]
STATE_IDS = ["Adadelta", "Rprop", "ASGD-loop", "ASGD-foreach", "Adafactor"]


@pytest.mark.parametrize(("cls", "options", "keys"), STATE, ids=STATE_IDS)
def test_the_state_is_torch_s_state(cls: Any, options: dict[str, Any], keys: list[str]) -> None:
    steps = _gradients("unused", 60)
    reference, topt = _theirs(cls, options, 0.05, {}, "unused", steps)
    _, opt = _ours(cls, options, 0.05, {}, "unused", steps)
    for key in keys:
        ours = list(getattr(opt, key))
        for i, p in enumerate(reference):
            theirs = topt.state[p].get(key)
            if theirs is None:  # Adafactor: the moment this parameter's rank does not use
                assert ours[i].numel() == 0, (key, i)
                continue
            torch.testing.assert_close(ours[i], theirs, rtol=0, atol=0, msg=f"{key}[{i}]")


def test_adafactor_factors_the_last_two_dimensions() -> None:
    params = [make_independent(torch.zeros(s)) for s in SHAPES]
    opt = Adafactor.init(params)
    assert [tuple(t.shape) for t in opt.row_var] == [(3, 1), (0,), (2, 3, 1), (0,), (1, 1)]
    assert [tuple(t.shape) for t in opt.col_var] == [(1, 4), (0,), (2, 1, 4), (0,), (1, 6)]
    assert [tuple(t.shape) for t in opt.variance] == [(0,), (5,), (0,), (), (0,)]


def test_rprop_reads_the_learning_rate_only_at_a_parameter_s_first_step() -> None:
    # torch.optim.Rprop sets a step size to the learning rate when the parameter's state is
    # created and never reads the learning rate again; a schedule only counts at step 0.
    steps = _gradients("step", 20)
    constant, _ = _ours(Rprop, {}, 0.05, {}, "step", steps)
    params = [make_independent(p) for p in _start(False)]
    opt = Rprop.init(params)
    for count, grads in enumerate(steps):
        new, opt = opt.step(0.05 if count == 0 else 10.0 * count, grads, params)
        params = [make_independent(p) for p in new]
    torch.testing.assert_close(params, constant, rtol=0, atol=0)


def test_float64_parameters_match_torch() -> None:
    # Adafactor's eps1=None is the machine epsilon of the parameter's dtype; ASGD's eta and mu
    # are float32 whatever the parameter's dtype (torch's step dtype)
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    for cls in (Adafactor, ASGD, Rprop, Adadelta):
        reference = [torch.nn.Parameter(p.clone()) for p in start]
        topt = TORCH[cls](reference, lr=0.05)
        params = [make_independent(p.clone()) for p in start]
        opt = cls.init(params)
        for _ in range(30):
            grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
            new, opt = opt.step(0.05, grads, params)
            params = [make_independent(p) for p in new]
            for p, g in zip(reference, grads, strict=True):
                p.grad = g
            topt.step()
        torch.testing.assert_close(params, [p.detach() for p in reference], rtol=0, atol=0)
        if isinstance(opt, ASGD):
            assert opt.eta[0].dtype == topt.state[reference[0]]["eta"].dtype == torch.float32


@st.composite
def _any_options(draw: st.DrawFn) -> tuple[Any, dict[str, Any], float]:
    """An optimizer, any valid options of it, and a learning rate."""
    cls = draw(st.sampled_from([Adadelta, Rprop, ASGD, Adafactor]))
    maximize = draw(st.booleans())
    decay = draw(st.floats(0.0, 0.5))
    if cls is Adadelta:
        options = {"rho": draw(st.floats(0.0, 1.0)), "eps": draw(st.floats(1e-8, 1e-2))}
        options["weight_decay"] = decay
    elif cls is Rprop:
        etas = (draw(st.floats(0.05, 0.95)), draw(st.floats(1.05, 3.0)))
        low = draw(st.floats(0.0, 1e-2))
        options = {"etas": etas, "step_sizes": (low, low + draw(st.floats(0.0, 1.0)))}
    elif cls is ASGD:
        options = {
            "lambd": draw(st.floats(0.0, 0.1)),
            "alpha": draw(st.floats(0.0, 1.0)),
            "t0": draw(st.floats(0.0, 8.0)),
            "weight_decay": decay,
            "foreach": draw(st.booleans()),
        }
    else:
        eps1 = draw(st.none() | st.floats(0.0, 1e-3))
        options = {
            "beta2_decay": draw(st.floats(-1.0, 0.0)),
            "eps": (eps1, draw(st.floats(0.0, 1e-1))),
            "d": draw(st.floats(1.0, 3.0)),
            "weight_decay": decay,
            "foreach": draw(st.booleans()),
        }
    return cls, {**options, "maximize": maximize}, draw(st.floats(1e-4, 1.0))


@given(case=_any_options())
@settings(max_examples=40, deadline=None)
def test_matches_torch_for_any_valid_options(case: tuple[Any, dict[str, Any], float]) -> None:
    cls, options, lr = case
    steps = _gradients("unused", 8)
    reference, _ = _theirs(cls, options, lr, {}, "unused", steps)
    got, _ = _ours(cls, options, lr, {}, "unused", steps)
    torch.testing.assert_close(got, [p.detach() for p in reference], rtol=0, atol=0)


# --- refusals, in torch.optim's words ---------------------------------------------------------

INVALID = [
    (Adadelta, {"rho": 1.5}, "Invalid rho value: 1.5"),
    (Adadelta, {"rho": -0.1}, "Invalid rho value: -0.1"),
    (Adadelta, {"eps": -1.0}, "Invalid epsilon value: -1.0"),
    (Adadelta, {"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
    (Rprop, {"etas": (1.5, 1.2)}, "Invalid eta values: 1.5, 1.2"),
    (Rprop, {"etas": (0.5, 0.9)}, "Invalid eta values: 0.5, 0.9"),
    (Rprop, {"etas": (0.0, 1.2)}, "Invalid eta values: 0.0, 1.2"),
    (ASGD, {"weight_decay": -0.5}, "Invalid weight_decay value: -0.5"),
    (Adafactor, {"beta2_decay": 0.5}, "beta2_decay should be <= 0 but is: 0.5"),
    (Adafactor, {"eps": (-1.0, 1e-3)}, "epsilon1 should be >= 0 but is: -1.0"),
    (Adafactor, {"eps": (None, -1.0)}, "epsilon2 should be >= 0 but is: -1.0"),
    (Adafactor, {"d": 0.5}, "Clipping threshold d should be >= 1 but is: 0.5"),
    (Adafactor, {"weight_decay": -1.0}, "weight_decay should be >= 0 but is: -1.0"),
]


@pytest.mark.parametrize(("cls", "options", "message"), INVALID)
def test_invalid_options_are_refused_as_torch_refuses_them(
    cls: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TORCH[cls]([torch.nn.Parameter(torch.zeros(2))], **options)
    with pytest.raises(ValueError, match=message):
        cls.init([make_independent(torch.zeros(2))], **options)
    # and per parameter, in an override
    with pytest.raises(ValueError, match=message):
        cls.init([make_independent(torch.zeros(2))], overrides={"0": options})


def test_adafactor_refuses_a_complex_parameter_it_would_train() -> None:
    params = [
        make_independent(torch.zeros(2)),
        make_independent(torch.zeros(2, 2, dtype=torch.cfloat)),
    ]
    with pytest.raises(TypeError, match=r"parameter 1 is torch.complex64"):
        Adafactor.init(params)
    with pytest.raises(TypeError, match="does not support complex parameters"):
        Adafactor().step(0.1, [torch.ones(2), torch.ones(2, 2, dtype=torch.cfloat)], params)
    opt = Adafactor.init(params, freeze="1")  # frozen: never stepped, so fine
    new, _ = opt.step(0.1, [torch.ones(2), None], params)
    assert new[1] is params[1]


def test_exported_from_diffprog_optim() -> None:
    for name in ("Adadelta", "Rprop", "ASGD", "Adafactor"):
        assert name in diffprog.optim.__all__ and getattr(diffprog.optim, name).__doc__


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [Adadelta, Rprop, ASGD, Adafactor], ids=lambda c: c.__name__)
def test_cuda_defaults_follow_torch_s_default_path(cls: Any) -> None:
    # torch.optim.ASGD(foreach=None) takes its multi-tensor path on CUDA (the for-loop path on
    # CPU, which the grid above checks): ASGD() must round as that path does there too.
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    reference = [torch.nn.Parameter(p.clone()) for p in start]
    topt = TORCH[cls](reference, lr=0.05)
    params = [make_independent(p.clone()) for p in start]
    opt = cls.init(params)
    for _ in range(20):
        grads = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
        new, opt = opt.step(0.05, grads, params)
        params = [make_independent(p) for p in new]
        for p, g in zip(reference, grads, strict=True):
            p.grad = g.clone()
        topt.step()
    torch.testing.assert_close(params, [p.detach() for p in reference], rtol=0, atol=0)
