"""RNNCell, LSTMCell, GRUCell: parity with torch.nn itself, init parity, a hand-written cell."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog.nn import (
    GRUCell,
    GRUCellSpec,
    LSTMCell,
    LSTMCellSpec,
    RNNCell,
    RNNCellSpec,
)
from diffprog.optim import GD, run_step

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: one thread is fastest, and spares a CPU shared with other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (our spec class, torch.nn class, extra constructor arguments)
CELLS: list[tuple[Any, type[torch.nn.Module], dict[str, Any]]] = [
    (RNNCellSpec, torch.nn.RNNCell, {}),
    (RNNCellSpec, torch.nn.RNNCell, {"nonlinearity": "relu"}),
    (LSTMCellSpec, torch.nn.LSTMCell, {}),
    (GRUCellSpec, torch.nn.GRUCell, {}),
]
CELL_IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _flat(item)]


def _reference(ours: Any, cls: type[torch.nn.Module], extra: dict[str, Any]) -> torch.nn.Module:
    """The torch.nn cell with our weights copied in."""
    ref = cls(
        ours.input_size, ours.hidden_size, bias=ours.bias, dtype=ours.weight_ih.dtype, **extra
    )
    ref.load_state_dict({name: p.detach() for name, p in dp.named_parameters(ours)})
    return ref


def _check_parity(ours: Any, ref: torch.nn.Module, inputs: list[torch.Tensor], lstm: bool) -> None:
    """Outputs and gradients w.r.t. input, state and parameters agree with torch.nn."""
    x = inputs[0].requires_grad_()
    states = [s.requires_grad_() for s in inputs[1:]]
    hx: Any = None
    if states:
        hx = (states[0], states[1]) if lstm else states[0]
    out_ours = _flat(ours(x, hx))
    out_ref = _flat(ref(x, hx))
    assert len(out_ours) == len(out_ref)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out_ref]
    loss_ours = sum((o * w).sum() for o, w in zip(out_ours, weights, strict=True))
    loss_ref = sum((o * w).sum() for o, w in zip(out_ref, weights, strict=True))
    wrt_ours = [x, *states, *dp.flatten_parameters(ours)]
    wrt_ref = [x, *states, *ref.parameters()]
    for a, b in zip(out_ours, out_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads_ours = torch.autograd.grad(loss_ours, wrt_ours)  # type: ignore[arg-type]
    grads_ref = torch.autograd.grad(loss_ref, wrt_ref)  # type: ignore[arg-type]
    for a, b in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_init_matches_torch_bit_for_bit(
    spec_cls: Any,
    torch_cls: type[torch.nn.Module],
    extra: dict[str, Any],
    dtype: torch.dtype,
    bias: bool,
) -> None:
    for seed in (0, 7):
        torch.manual_seed(seed)
        ref = torch_cls(5, 6, bias=bias, dtype=dtype, **extra)
        ours = dp.sample(
            spec_cls(5, 6, bias=bias, **extra),
            generator=torch.Generator().manual_seed(seed),
            dtype=dtype,
        )
        names = [name for name, _ in dp.named_parameters(ours)]
        assert names == list(ref.state_dict())
        for name, p in dp.named_parameters(ours):
            assert isinstance(p, torch.nn.Parameter) and p.dtype == dtype
            assert torch.equal(p, ref.get_parameter(name)), name


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), CELLS, ids=CELL_IDS)
def test_global_generator_is_torch_manual_seed(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any]
) -> None:
    torch.manual_seed(3)
    ref = torch_cls(2, 3, **extra)
    torch.manual_seed(3)
    ours = dp.sample(spec_cls(2, 3, **extra))
    assert all(
        torch.equal(p, q)
        for p, q in zip(dp.flatten_parameters(ours), ref.parameters(), strict=True)
    )


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_meta_device_gives_shapes(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any], dtype: torch.dtype
) -> None:
    ours = dp.sample(spec_cls(4, 7, **extra), device="meta", dtype=dtype)
    ref = torch_cls(4, 7, device="meta", dtype=dtype, **extra)
    for (name, p), (ref_name, q) in zip(
        dp.named_parameters(ours), ref.named_parameters(), strict=True
    ):
        assert name == ref_name and p.is_meta and p.shape == q.shape and p.dtype == dtype


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 3, 5), (2, 8, 3)], ids=str)
@pytest.mark.parametrize("state", ["none", "given"])
def test_forward_and_gradients_match_torch(
    spec_cls: Any,
    torch_cls: type[torch.nn.Module],
    extra: dict[str, Any],
    dtype: torch.dtype,
    bias: bool,
    shape: tuple[int, int, int],
    state: str,
) -> None:
    batch, input_size, hidden = shape
    ours = dp.sample(
        spec_cls(input_size, hidden, bias=bias, **extra),
        generator=torch.Generator().manual_seed(0),
        dtype=dtype,
    )
    ref = _reference(ours, torch_cls, extra)
    g = torch.Generator().manual_seed(2)
    lstm = spec_cls is LSTMCellSpec
    inputs = [torch.randn(batch, input_size, generator=g, dtype=dtype)]
    if state == "given":
        inputs += [
            torch.randn(batch, hidden, generator=g, dtype=dtype) for _ in range(2 if lstm else 1)
        ]
    _check_parity(ours, ref, inputs, lstm)


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("state", ["none", "given"])
def test_unbatched_matches_torch(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any], state: str
) -> None:
    ours = dp.sample(spec_cls(3, 4, **extra), generator=torch.Generator().manual_seed(0))
    ref = _reference(ours, torch_cls, extra)
    lstm = spec_cls is LSTMCellSpec
    inputs = [torch.randn(3)]
    if state == "given":
        inputs += [torch.randn(4) for _ in range(2 if lstm else 1)]
    _check_parity(ours, ref, inputs, lstm)
    for out in _flat(ours(torch.randn(3))):
        assert out.shape == (4,)


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(range(len(CELLS))),
    batch=st.integers(1, 4),
    input_size=st.integers(1, 5),
    hidden=st.integers(1, 5),
    steps=st.integers(1, 4),
)
def test_unrolled_sequences_match_torch(
    kind: int, batch: int, input_size: int, hidden: int, steps: int
) -> None:
    spec_cls, torch_cls, extra = CELLS[kind]
    ours = dp.sample(spec_cls(input_size, hidden, **extra), dtype=torch.float64)
    ref = _reference(ours, torch_cls, extra)
    xs = torch.randn(steps, batch, input_size, dtype=torch.float64)
    state_ours: Any = None
    state_ref: Any = None
    for x in xs:
        state_ours = ours(x, state_ours)
        state_ref = ref(x, state_ref)
    for a, b in zip(_flat(state_ours), _flat(state_ref), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_named_parameters_replace_and_properties() -> None:
    cell = dp.sample(LSTMCellSpec(3, 4), generator=torch.Generator().manual_seed(0))
    assert (cell.input_size, cell.hidden_size, cell.bias) == (3, 4, True)
    assert [tuple(p.shape) for p in dp.flatten_parameters(cell)] == [(16, 3), (16, 4), (16,), (16,)]
    zeros = [dp.make_independent(torch.zeros_like(p)) for p in dp.flatten_parameters(cell)]
    rebuilt = dp.replace_parameters(cell, zeros)
    assert isinstance(rebuilt, LSTMCell) and all(
        p.abs().sum() == 0 for p in dp.flatten_parameters(rebuilt)
    )
    assert all(p.abs().sum() > 0 for p in dp.flatten_parameters(cell))  # the original is unchanged
    h, c = rebuilt(torch.randn(2, 3))
    assert torch.equal(h, torch.zeros(2, 4)) and torch.equal(c, torch.zeros(2, 4))
    no_bias = dp.sample(GRUCellSpec(3, 4, bias=False))
    assert (
        no_bias.bias is False
        and no_bias.bias_ih is None
        and len(dp.flatten_parameters(no_bias)) == 2
    )


def test_errors_name_the_problem() -> None:
    cell = dp.sample(RNNCellSpec(3, 4))
    with pytest.raises(ValueError, match="1D or 2D"):
        cell(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="hidden to be 2D"):
        cell(torch.randn(2, 3), torch.randn(4))
    lstm = dp.sample(LSTMCellSpec(3, 4))
    with pytest.raises(ValueError, match=r"hx\[1\] to be 1D"):
        lstm(torch.randn(3), (torch.randn(4), torch.randn(1, 4)))
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        RNNCellSpec(3, 4, nonlinearity="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        RNNCell(cell.weight_ih, cell.weight_hh, nonlinearity="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        GRUCellSpec(3, 0)
    with pytest.raises(TypeError, match="input_size should be of type int"):
        GRUCellSpec(3.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"4\*hidden_size"):
        LSTMCell(cell.weight_ih, cell.weight_hh)  # RNNCell weights are not an LSTM's
    with pytest.raises(ValueError, match="both bias_ih and bias_hh"):
        RNNCell(cell.weight_ih, cell.weight_hh, cell.bias_ih)


def test_cell_in_a_user_model_trains() -> None:
    """A cell inside a user's record, unrolled over time, trains with run_step."""

    class Tagger(dp.Parameterized):
        cell: GRUCell
        head: torch.Tensor  # a Parameter

        def __call__(self, xs: torch.Tensor) -> torch.Tensor:
            h = None
            for x in xs:
                h = self.cell(x, h)
            assert h is not None
            return h @ self.head

    g = torch.Generator().manual_seed(0)
    model = Tagger(
        dp.sample(GRUCellSpec(2, 8), generator=g),
        dp.make_independent(torch.randn(8, 1, generator=g)),
    )
    assert [n for n, _ in dp.named_parameters(model)] == [
        "cell.weight_ih",
        "cell.weight_hh",
        "cell.bias_ih",
        "cell.bias_hh",
        "head",
    ]
    xs = torch.randn(5, 16, 2, generator=g)
    target = xs.sum(dim=(0, 2)).unsqueeze(-1)
    optimizer = GD()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(xs), target)
        losses.append(loss.item())
        model, optimizer = run_step(model, optimizer, loss, 0.05)
    assert losses[-1] < 0.5 * losses[0]


class ElmanCell(dp.Parameterized):
    """A user-written Elman cell with a hand-written instance, as in Hasktorch's RNN examples."""

    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    bias: torch.Tensor

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.weight_ih, self.weight_hh, self.bias]

    def replace_own_parameters(self, stream: dp.ParamStream) -> ElmanCell:
        weight_ih = stream.next_parameter()
        weight_hh = stream.next_parameter()
        bias = stream.next_parameter()
        return ElmanCell(weight_ih, weight_hh, bias)

    def __call__(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight_ih.T + h @ self.weight_hh.T + self.bias)


def test_hand_written_instance_matches_rnn_cell_and_trains() -> None:
    ref = dp.sample(RNNCellSpec(3, 4), generator=torch.Generator().manual_seed(0))
    assert ref.bias_ih is not None and ref.bias_hh is not None
    cell = ElmanCell(
        dp.make_independent(ref.weight_ih),
        dp.make_independent(ref.weight_hh),
        dp.make_independent(ref.bias_ih + ref.bias_hh),
    )
    assert [n for n, _ in dp.named_parameters(cell)] == ["weight_ih", "weight_hh", "bias"]
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    torch.testing.assert_close(cell(x, h), ref(x, h))

    params = dp.flatten_parameters(cell)
    doubled = dp.replace_parameters(cell, [dp.make_independent(p * 2) for p in params])
    assert isinstance(doubled, ElmanCell)
    assert torch.equal(doubled.weight_hh, cell.weight_hh * 2)
    with pytest.raises(dp.ParameterCountError):
        dp.replace_parameters(cell, params[:2])

    xs, target = torch.randn(6, 8, 3), torch.zeros(8, 4)
    optimizer = GD()
    losses = []
    for _ in range(10):
        h = torch.zeros(8, 4)
        for x_t in xs:
            h = cell(x_t, h)
        loss = (h - target).pow(2).mean()
        losses.append(loss.item())
        cell, optimizer = run_step(cell, optimizer, loss, 0.5)
    assert isinstance(cell, ElmanCell) and losses[-1] < losses[0]
