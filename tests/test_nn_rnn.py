"""RNN, LSTM, GRU over sequences: parity with torch.nn itself, init parity, dropout, training."""

from __future__ import annotations

import copy
import itertools
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import diffprog as dp
from diffprog.nn import (
    GRU,
    LSTM,
    RNN,
    GRUCell,
    GRUSpec,
    LinearSpec,
    LSTMCell,
    LSTMSpec,
    RNNCell,
    RNNSpec,
    evaluating,
    training,
)
from diffprog.optim import GD, run_step

# torch warns once per process when a float32 LSTM with projections skips oneDNN on the CPU.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: one thread is fastest, and spares a CPU shared with other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (our spec class, torch.nn class, extra constructor arguments)
KINDS: list[tuple[Any, type[torch.nn.Module], dict[str, Any]]] = [
    (RNNSpec, torch.nn.RNN, {}),
    (RNNSpec, torch.nn.RNN, {"nonlinearity": "relu"}),
    (GRUSpec, torch.nn.GRU, {}),
    (LSTMSpec, torch.nn.LSTM, {}),
    (LSTMSpec, torch.nn.LSTM, {"proj_size": 3}),
]
KIND_IDS = ["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj"]


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _flat(item)]


def _reference(
    ours: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any]
) -> torch.nn.Module:
    """The torch.nn layer with the same hyper-parameters and our weights copied in."""
    ref = torch_cls(
        ours.input_size,
        ours.hidden_size,
        num_layers=ours.num_layers,
        bias=ours.bias,
        batch_first=ours.batch_first,
        dropout=ours.dropout,
        bidirectional=ours.bidirectional,
        dtype=ours.weight_ih_l0.dtype,
        **extra,
    )
    ref.load_state_dict({name: p.detach() for name, p in dp.named_parameters(ours)})
    return ref


def _states(
    ours: Any, batch: int | None, dtype: torch.dtype, g: torch.Generator
) -> list[torch.Tensor]:
    rows = ours.num_layers * (2 if ours.bidirectional else 1)
    sizes = (
        [ours.proj_size or ours.hidden_size, ours.hidden_size]
        if isinstance(ours, LSTM)
        else [ours.hidden_size]
    )
    lead = (rows,) if batch is None else (rows, batch)
    return [torch.randn(*lead, size, generator=g, dtype=dtype) for size in sizes]


def _check_parity(
    ours: Any, ref: torch.nn.Module, x: Any, states: list[torch.Tensor], *, grad_input: bool = True
) -> None:
    """Outputs, final states and gradients w.r.t. input, initial state and parameters agree."""
    for s in states:
        s.requires_grad_()
    hx: Any = None
    if states:
        hx = (states[0], states[1]) if isinstance(ours, LSTM) else states[0]
    out_ours = _flat(ours(x, hx))
    out_ref = _flat(ref(x, hx))
    assert [o.shape for o in out_ours] == [o.shape for o in out_ref]
    for a, b in zip(out_ours, out_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in out_ref]
    loss_ours = sum((o * w).sum() for o, w in zip(out_ours, weights, strict=True))
    loss_ref = sum((o * w).sum() for o, w in zip(out_ref, weights, strict=True))
    inputs = [_flat(x)[0]] if grad_input else []
    grads_ours = torch.autograd.grad(loss_ours, [*inputs, *states, *dp.flatten_parameters(ours)])  # type: ignore[arg-type]
    grads_ref = torch.autograd.grad(loss_ref, [*inputs, *states, *ref.parameters()])  # type: ignore[arg-type]
    for a, b in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_layers", "bidirectional", "bias"), [(1, False, True), (2, True, True), (2, False, False)]
)
def test_init_matches_torch_bit_for_bit(
    spec_cls: Any,
    torch_cls: type[torch.nn.Module],
    extra: dict[str, Any],
    dtype: torch.dtype,
    num_layers: int,
    bidirectional: bool,
    bias: bool,
) -> None:
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, **extra)
    torch.manual_seed(5)
    ref = torch_cls(4, 6, dtype=dtype, **kw)
    ours = dp.sample(spec_cls(4, 6, **kw), generator=torch.Generator().manual_seed(5), dtype=dtype)
    assert [name for name, _ in dp.named_parameters(ours)] == list(ref.state_dict())
    for name, p in dp.named_parameters(ours):
        assert isinstance(p, torch.nn.Parameter) and p.dtype == dtype
        assert torch.equal(p, ref.get_parameter(name)), name
    for attr in (
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "bidirectional",
        "proj_size",
        "mode",
    ):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert [[tuple(p.shape) for p in ws] for ws in ours.all_weights] == [
        [tuple(p.shape) for p in ws] for ws in ref.all_weights
    ]


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_meta_device_gives_shapes(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any], dtype: torch.dtype
) -> None:
    kw = dict(num_layers=2, bidirectional=True, **extra)
    ours = dp.sample(spec_cls(4, 6, **kw), device="meta", dtype=dtype)
    ref = torch_cls(4, 6, device="meta", dtype=dtype, **kw)
    pairs = list(zip(dp.named_parameters(ours), ref.named_parameters(), strict=True))
    for (name, p), (ref_name, q) in pairs:
        assert name == ref_name and p.is_meta and p.shape == q.shape and p.dtype == dtype


def test_global_generator_is_torch_manual_seed() -> None:
    torch.manual_seed(3)
    ref = torch.nn.GRU(2, 3, num_layers=2)
    torch.manual_seed(3)
    ours = dp.sample(GRUSpec(2, 3, num_layers=2))
    assert all(
        torch.equal(p, q)
        for p, q in zip(dp.flatten_parameters(ours), ref.parameters(), strict=True)
    )


CONFIGS = list(
    itertools.product([1, 2], [False, True], [False, True])
)  # num_layers, bidirectional, batch_first


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_layers", "bidirectional", "batch_first"), CONFIGS)
def test_forward_and_gradients_match_torch(
    spec_cls: Any,
    torch_cls: type[torch.nn.Module],
    extra: dict[str, Any],
    dtype: torch.dtype,
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
) -> None:
    spec = spec_cls(
        5, 4, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, **extra
    )
    ours = dp.sample(spec, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = _reference(ours, torch_cls, extra)
    g = torch.Generator().manual_seed(2)
    seq, batch = 6, 3
    shape = (batch, seq, 5) if batch_first else (seq, batch, 5)
    x = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    _check_parity(ours, ref, x, _states(ours, batch, dtype, g))  # with an initial state
    _check_parity(ours, ref, x, [])  # zeros


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize(
    ("seq", "batch", "input_size", "hidden"), [(1, 1, 1, 4), (3, 7, 2, 5), (9, 2, 6, 8)]
)
def test_shapes_and_no_bias_match_torch(
    spec_cls: Any,
    torch_cls: type[torch.nn.Module],
    extra: dict[str, Any],
    seq: int,
    batch: int,
    input_size: int,
    hidden: int,
) -> None:
    for bias in (True, False):
        ours = dp.sample(
            spec_cls(input_size, hidden, num_layers=2, bias=bias, **extra), dtype=torch.float64
        )
        ref = _reference(ours, torch_cls, extra)
        x = torch.randn(seq, batch, input_size, dtype=torch.float64, requires_grad=True)
        _check_parity(
            ours, ref, x, _states(ours, batch, torch.float64, torch.Generator().manual_seed(0))
        )


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_matches_torch(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any], batch_first: bool
) -> None:
    spec = spec_cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, **extra)
    ours = dp.sample(spec, generator=torch.Generator().manual_seed(0))
    ref = _reference(ours, torch_cls, extra)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, requires_grad=True)
    _check_parity(ours, ref, x, _states(ours, None, torch.float32, g))
    _check_parity(ours, ref, x, [])
    output, state = ours(x)
    assert output.shape == (6, 2 * (ours.proj_size or 4))
    for h in _flat(state):
        assert h.dim() == 2 and h.shape[0] == 4


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequences_match_torch(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any], enforce_sorted: bool
) -> None:
    spec = spec_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, **extra)
    ours = dp.sample(spec, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _reference(ours, torch_cls, extra)
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([5, 4, 2]) if enforce_sorted else torch.tensor([2, 5, 3])
    padded = torch.randn(3, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def pack() -> PackedSequence:  # a fresh graph from padded each time
        return pack_padded_sequence(
            padded, lengths, batch_first=True, enforce_sorted=enforce_sorted
        )

    _check_parity(ours, ref, pack(), _states(ours, 3, torch.float64, g), grad_input=False)
    _check_parity(ours, ref, pack(), [], grad_input=False)
    output, _ = ours(pack())
    assert isinstance(output, PackedSequence)
    assert torch.equal(output.batch_sizes, pack().batch_sizes)
    if enforce_sorted:
        assert output.sorted_indices is None and output.unsorted_indices is None
    else:
        assert output.unsorted_indices is not None and pack().unsorted_indices is not None
        assert torch.equal(output.unsorted_indices, pack().unsorted_indices)
    # gradients reach the padded input through the packing
    (grad,) = torch.autograd.grad(_flat(ours(pack()))[0].sum(), [padded])
    (grad_ref,) = torch.autograd.grad(_flat(ref(pack()))[0].sum(), [padded])
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
def test_training_dropout_matches_torch(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any]
) -> None:
    """In training mode the masks equal torch.nn's for the same seed: global RNG or a generator."""
    ours = dp.sample(spec_cls(3, 6, num_layers=3, dropout=0.4, bidirectional=True, **extra))
    ref = _reference(ours, torch_cls, extra).train()
    x = torch.randn(5, 2, 3)
    torch.manual_seed(11)
    expected = _flat(ref(x))

    torch.manual_seed(11)  # torch's global generator, as torch.nn
    got, same = training(lambda m, x: m(x), ours, x)
    assert same is ours
    for a, b in zip(_flat(got), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    got, _ = training(lambda m, x: m(x), ours, x, generator=torch.Generator().manual_seed(11))
    for a, b in zip(_flat(got), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    got = ours(x, training=True, generator=torch.Generator().manual_seed(11))
    for a, b in zip(_flat(got), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # gradients flow through the masks as in torch
    torch.manual_seed(11)
    loss_ref = sum(o.sum() for o in _flat(ref(x)))
    loss = sum(
        o.sum() for o in _flat(ours(x, training=True, generator=torch.Generator().manual_seed(11)))
    )
    for a, b in zip(
        torch.autograd.grad(loss, dp.flatten_parameters(ours)),  # type: ignore[arg-type]
        torch.autograd.grad(loss_ref, list(ref.parameters())),  # type: ignore[arg-type]
        strict=True,
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_training_dropout_masks_and_gradients_match_torch_in_every_layout(
    spec_cls: Any,
    torch_cls: type[torch.nn.Module],
    extra: dict[str, Any],
    bidirectional: bool,
    batch_first: bool,
    batched: bool,
) -> None:
    """Issue 8 item 3: the masks between layers are torch.nn's for one seed in every layout.

    ATen draws them on [seq, batch, H] even for a batch_first input; diffprog drew them on
    [batch, seq, H] when given a generator, so outputs and gradients differed with batch_first.
    """
    spec = spec_cls(
        3,
        6,
        num_layers=3,
        dropout=0.4,
        bidirectional=bidirectional,
        batch_first=batch_first,
        **extra,
    )
    ours = dp.sample(spec, dtype=torch.float64)
    ref = _reference(ours, torch_cls, extra).train()
    shape = ((4, 5, 3) if batch_first else (5, 4, 3)) if batched else (5, 3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    seed = 23
    torch.manual_seed(seed)
    expected = _flat(ref(x))
    cotangents = [torch.randn_like(o) for o in expected]
    grads_ref = torch.autograd.grad(
        sum((o * c).sum() for o, c in zip(expected, cotangents, strict=True)),
        [x, *ref.parameters()],
    )

    def run_with(generator: torch.Generator | None) -> tuple[Any, ...]:
        if generator is None:
            torch.manual_seed(seed)  # torch's global generator, as torch.nn
        got, _ = training(lambda m, x: m(x), ours, x, generator=generator)
        outs = _flat(got)
        loss = sum((o * c).sum() for o, c in zip(outs, cotangents, strict=True))
        return tuple(outs), torch.autograd.grad(loss, [x, *dp.flatten_parameters(ours)])

    for generator in (None, torch.Generator().manual_seed(seed)):
        outs, grads = run_with(generator)
        for a, b in zip(outs, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b)


def test_dropout_is_off_in_eval_mode_and_packed_training_matches_torch() -> None:
    lstm = dp.sample(
        LSTMSpec(3, 4, num_layers=2, dropout=0.5, batch_first=True), dtype=torch.float64
    )
    ref = _reference(lstm, torch.nn.LSTM, {})
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    ref.eval()
    with evaluating():
        for a, b in zip(_flat(lstm(x)), _flat(ref(x)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        a1 = _flat(lstm(x, training=True))[0]
        assert not torch.equal(a1, _flat(lstm(x))[0])  # dropout changed something
    ref.train()
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    torch.manual_seed(4)
    expected = _flat(ref(packed))
    got = _flat(lstm(packed, training=True, generator=torch.Generator().manual_seed(4)))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    all_dropped = dp.sample(LSTMSpec(3, 4, num_layers=2, dropout=1.0))
    ref_dropped = _reference(all_dropped, torch.nn.LSTM, {}).train()
    x32 = x.float()
    got = _flat(all_dropped(x32, training=True, generator=torch.Generator()))
    for a, b in zip(got, _flat(ref_dropped(x32)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


CELL_OF = {RNN: RNNCell, LSTM: LSTMCell, GRU: GRUCell}


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(range(len(KINDS) - 1)),  # no projection: cells have none
    seq=st.integers(1, 5),
    batch=st.integers(1, 3),
    input_size=st.integers(1, 4),
    hidden=st.integers(1, 4),
)
def test_a_layer_is_its_cell_unrolled_both_ways(
    kind: int, seq: int, batch: int, input_size: int, hidden: int
) -> None:
    """Forward direction: the cell folded over time; reverse: the same on the flipped sequence."""
    spec_cls, _, extra = KINDS[kind]
    layer = dp.sample(
        spec_cls(input_size, hidden, bidirectional=True, **extra), dtype=torch.float64
    )
    x = torch.randn(seq, batch, input_size, dtype=torch.float64)
    output, _ = layer(x)
    for suffix, xs, half in (
        ("", x, output[..., :hidden]),
        ("_reverse", x.flip(0), output[..., hidden:].flip(0)),
    ):
        w = layer.weights
        cell_kw = {"nonlinearity": layer.nonlinearity} if isinstance(layer, RNN) else {}
        cell = CELL_OF[type(layer)](
            w[f"weight_ih_l0{suffix}"],
            w[f"weight_hh_l0{suffix}"],
            w[f"bias_ih_l0{suffix}"],
            w[f"bias_hh_l0{suffix}"],
            **cell_kw,
        )
        state: Any = None
        steps = []
        for x_t in xs:
            state = cell(x_t, state)
            steps.append(state[0] if isinstance(layer, LSTM) else state)
        torch.testing.assert_close(torch.stack(steps), half)


def test_a_small_lstm_learns() -> None:
    """An LSTM and a linear head learn to output the running sum's sign, in a few GD steps."""

    class Model(dp.Parameterized):
        lstm: LSTM
        head: Any

        def __call__(self, xs: torch.Tensor) -> torch.Tensor:
            output, _ = self.lstm(xs)
            return self.head(output)

    g = torch.Generator().manual_seed(0)
    model = Model(
        dp.sample(LSTMSpec(1, 8, batch_first=True), generator=g),
        dp.sample(LinearSpec(8, 1), generator=g),
    )
    xs = torch.randn(32, 6, 1, generator=g)
    target = torch.tanh(xs.cumsum(dim=1))
    optimizer = GD()
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(xs), target)
        losses.append(loss.item())
        model, optimizer = run_step(model, optimizer, loss, 0.5)
    assert isinstance(model.lstm, LSTM)
    assert losses[-1] < 0.5 * losses[0]


def test_named_parameters_attributes_and_replace() -> None:
    lstm = dp.sample(
        LSTMSpec(3, 4, num_layers=2, bidirectional=True), generator=torch.Generator().manual_seed(0)
    )
    assert lstm.weight_hh_l1_reverse is lstm.weights["weight_hh_l1_reverse"]
    with pytest.raises(AttributeError, match="weight_hh_l2"):
        _ = lstm.weight_hh_l2
    params = dp.flatten_parameters(lstm)
    assert params == list(lstm.weights.values())
    rebuilt = dp.replace_parameters(lstm, [dp.make_independent(p * 0) for p in params])
    assert isinstance(rebuilt, LSTM) and list(rebuilt.weights) == list(lstm.weights)
    assert rebuilt.weight_ih_l0.abs().sum() == 0 and lstm.weight_ih_l0.abs().sum() > 0
    output, (h_n, _) = rebuilt(torch.randn(5, 2, 3))
    assert torch.equal(output, torch.zeros(5, 2, 8)) and torch.equal(h_n, torch.zeros(4, 2, 4))
    # a torch.nn layer's parameters build the layer directly
    torch_gru = torch.nn.GRU(3, 4, num_layers=2, batch_first=True)
    gru = GRU(dict(torch_gru.named_parameters()), batch_first=True)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(gru(x)[0], torch_gru(x)[0])


def test_layer_checks_its_weights() -> None:
    rnn = dp.sample(RNNSpec(3, 4, num_layers=2))
    with pytest.raises(ValueError, match="weight_ih_l0, weight_hh_l0"):
        RNN({})
    w = dict(rnn.weights)
    del w["bias_hh_l1"]
    with pytest.raises(ValueError, match=r"missing \['bias_hh_l1'\]"):
        RNN(w)
    reordered = dict(reversed(list(rnn.weights.items())))
    with pytest.raises(ValueError, match="in the order"):
        RNN(reordered)
    wrong = dict(rnn.weights, weight_hh_l1=dp.make_independent(torch.zeros(4, 5)))
    with pytest.raises(ValueError, match=r"weight_hh_l1 must have shape \(4, 4\)"):
        RNN(wrong)
    with pytest.raises(ValueError, match="range"):
        RNN(rnn.weights, dropout=1.5)
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        RNN(rnn.weights, nonlinearity="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unexpected \['weight_hr_l0'"):
        GRU(dict(dp.sample(LSTMSpec(3, 4, proj_size=2)).weights))


def test_forward_errors_name_the_problem() -> None:
    lstm = dp.sample(LSTMSpec(3, 4, num_layers=2))
    with pytest.raises(ValueError, match="2D or 3D"):
        lstm(torch.randn(3))
    with pytest.raises(ValueError, match="does not match weight dtype"):
        lstm(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 2"):
        lstm(torch.randn(5, 2, 2))
    with pytest.raises(
        RuntimeError, match=r"Expected hidden\[1\] size \(2, 2, 4\), got \[1, 2, 4\]"
    ):
        lstm(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(RuntimeError, match="should also be 2-D"):
        lstm(torch.randn(5, 3), (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)))
    with pytest.raises(TypeError, match=r"a tuple \(h_0, c_0\) of two tensors, got Tensor"):
        lstm(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))  # type: ignore[call-overload]
    gru = dp.sample(GRUSpec(3, 4))
    with pytest.raises(RuntimeError, match="should also be 3-D"):
        gru(torch.randn(5, 2, 3), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="hx must be a tensor, got tuple"):
        gru(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),))  # type: ignore[call-overload]


def test_copy_and_pickle_keep_the_layer() -> None:
    rnn = dp.sample(RNNSpec(3, 4, num_layers=2, nonlinearity="relu", batch_first=True))
    x = torch.randn(2, 5, 3)
    for twin in (copy.deepcopy(rnn), pickle.loads(pickle.dumps(rnn))):
        assert isinstance(twin, RNN) and twin.nonlinearity == "relu" and twin.batch_first
        assert list(twin.weights) == list(rnn.weights)
        torch.testing.assert_close(twin(x)[0], rnn(x)[0])


def test_spec_checks_as_torch() -> None:
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        LSTMSpec(3, 4, dropout=0.2)
    with pytest.raises(ValueError, match="proj_size has to be smaller"):
        LSTMSpec(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="range"):
        GRUSpec(3, 4, dropout=-0.1)
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        RNNSpec(3, 0)
    with pytest.raises(ValueError, match="num_layers must be greater than zero"):
        GRUSpec(3, 4, num_layers=0)
    with pytest.raises(TypeError, match="batch_first should be of type bool"):
        GRUSpec(3, 4, batch_first=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        RNNSpec(3, 4, nonlinearity="sigmoid")  # type: ignore[arg-type]
    assert RNNSpec(3, 4, 2, "relu") == RNNSpec(
        3, 4, num_layers=2, nonlinearity="relu"
    )  # torch's positions


@pytest.mark.cuda
@pytest.mark.parametrize(("spec_cls", "torch_cls", "extra"), KINDS, ids=KIND_IDS)
def test_cuda_matches_torch_without_warnings(
    spec_cls: Any, torch_cls: type[torch.nn.Module], extra: dict[str, Any]
) -> None:
    spec = spec_cls(3, 8, num_layers=2, bidirectional=True, batch_first=True, **extra)
    ours = dp.sample(spec, generator=torch.Generator().manual_seed(0), device="cuda")
    ref = _reference(ours, torch_cls, extra).cuda()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 3, generator=g).cuda().requires_grad_()
    _check_parity(ours, ref, x, [s.cuda() for s in _states(ours, 4, torch.float32, g)])


@pytest.mark.cuda
def test_cuda_gradients_in_eval_and_in_a_training_pass_with_dropout() -> None:
    # cuDNN can only differentiate a forward pass run in its train mode; diffprog's layers are
    # in eval mode by default yet differentiated at every step.
    model = dp.sample(LSTMSpec(3, 8, num_layers=2, dropout=0.3), device="cuda")
    x = torch.randn(5, 2, 3, device="cuda", requires_grad=True)
    with evaluating():
        (gx,) = torch.autograd.grad(model(x)[0].sum(), x)
    reference = _reference(model, torch.nn.LSTM, {}).cuda().eval()
    torch.testing.assert_close(gx, torch.autograd.grad(reference(x)[0].sum(), x)[0])
    loss, _ = training(
        lambda m, x: m(x)[0].sum(), model, x, generator=torch.Generator().manual_seed(0)
    )
    (gx_train,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gx_train).all()
