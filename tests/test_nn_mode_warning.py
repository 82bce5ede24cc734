"""Issue 8 item 11: a mode-dependent layer run with gradients but no chosen mode warns.

diffprog layers evaluate unless told otherwise, where a torch.nn module starts in train()
mode: a forgotten ``nn.training`` silently trained without dropout and without updating the
running statistics. Now such a call gives a ``nn.ModeWarning``; choosing a mode (``training``,
``evaluating``, ``training=``) or recording no gradients keeps it silent, and so does a layer
whose behaviour does not depend on the mode.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import diffprog as dp
from diffprog import nn

# A layer and a call of it on an input that requires grad: (name, make, call).
Case = tuple[str, Callable[[], Any], Callable[[Any, torch.Tensor], Any]]


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, requires_grad=True)


def _rnn(spec: Any) -> Callable[[], Any]:
    return lambda: dp.sample(spec)


# Every layer whose behaviour depends on the mode, with the input shape it takes.
MODE_DEPENDENT: list[tuple[str, Callable[[], Any], Callable[[], torch.Tensor]]] = [
    ("Dropout", lambda: dp.sample(nn.DropoutSpec(0.5)), _x(4, 3)),
    ("Dropout1d", lambda: dp.sample(nn.Dropout1dSpec(0.5)), _x(2, 3, 4)),
    ("Dropout2d", lambda: dp.sample(nn.Dropout2dSpec(0.5)), _x(2, 3, 4, 4)),
    ("Dropout3d", lambda: dp.sample(nn.Dropout3dSpec(0.5)), _x(2, 3, 2, 2, 2)),
    ("AlphaDropout", lambda: dp.sample(nn.AlphaDropoutSpec(0.5)), _x(4, 3)),
    ("FeatureAlphaDropout", lambda: dp.sample(nn.FeatureAlphaDropoutSpec(0.5)), _x(2, 3, 4)),
    ("BatchNorm1d", lambda: dp.sample(nn.BatchNorm1dSpec(3)), _x(4, 3)),
    ("BatchNorm2d", lambda: dp.sample(nn.BatchNorm2dSpec(3)), _x(2, 3, 2, 2)),
    ("BatchNorm3d", lambda: dp.sample(nn.BatchNorm3dSpec(3)), _x(2, 3, 2, 2, 2)),
    (
        "InstanceNorm1d",
        lambda: dp.sample(nn.InstanceNorm1dSpec(3, track_running_stats=True)),
        _x(2, 3, 5),
    ),
    (
        "InstanceNorm2d",
        lambda: dp.sample(nn.InstanceNorm2dSpec(3, track_running_stats=True)),
        _x(3, 4, 4),  # unbatched
    ),
    (
        "InstanceNorm3d",
        lambda: dp.sample(nn.InstanceNorm3dSpec(3, affine=True, track_running_stats=True)),
        _x(1, 3, 2, 2, 2),
    ),
    ("RNN", _rnn(nn.RNNSpec(3, 4, num_layers=2, dropout=0.3)), _x(5, 2, 3)),
    ("LSTM", _rnn(nn.LSTMSpec(3, 4, num_layers=2, dropout=0.3, batch_first=True)), _x(2, 5, 3)),
    ("GRU", _rnn(nn.GRUSpec(3, 4, num_layers=3, dropout=0.3)), _x(5, 3)),  # unbatched
    (
        "MultiheadAttention",
        lambda: dp.sample(nn.MultiheadAttentionSpec(4, 2, dropout=0.1)),
        _x(3, 2, 4),
    ),
    (
        "TransformerEncoderLayer",
        lambda: dp.sample(nn.TransformerEncoderLayerSpec(4, 2, 8, dropout=0.1)),
        _x(3, 2, 4),
    ),
    (
        "TransformerEncoder",
        lambda: dp.sample(
            nn.TransformerEncoderSpec(nn.TransformerEncoderLayerSpec(4, 2, 8, dropout=0.1), 2)
        ),
        _x(3, 2, 4),
    ),
]
IDS = [name for name, _, _ in MODE_DEPENDENT]


def _call(layer: Any, x: torch.Tensor, **kw: Any) -> Any:
    if isinstance(layer, nn.MultiheadAttention):
        return layer(x, x, x, **kw)
    return layer(x, **kw)


@pytest.fixture(autouse=True)
def _mode_warnings_are_errors() -> Iterator[None]:
    """Every test sees each ModeWarning (as an error) unless it sets its own filter."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", nn.ModeWarning)
        yield


def test_the_warning_classes_are_exported() -> None:
    assert issubclass(dp.DiffprogWarning, UserWarning)
    assert issubclass(nn.ModeWarning, dp.DiffprogWarning)
    assert "DiffprogWarning" in dp.__all__ and "ModeWarning" in nn.__all__
    assert "evaluating" in nn.__all__


@pytest.mark.parametrize(("name", "make", "make_x"), MODE_DEPENDENT, ids=IDS)
def test_a_mode_dependent_layer_warns_with_gradients_and_no_mode(
    name: str, make: Callable[[], Any], make_x: Callable[[], torch.Tensor]
) -> None:
    layer, x = make(), make_x()
    with pytest.warns(nn.ModeWarning) as caught:
        _call(layer, x)
    message = str(caught[0].message)
    assert "ran in evaluation mode" in message
    assert "diffprog.nn.training(" in message and "diffprog.nn.evaluating()" in message
    # Attributed to the caller outside diffprog.nn (here: _call in this file), so that the
    # warnings module's default rule shows it once per place in the user's code.
    assert caught[0].filename == __file__


@pytest.mark.parametrize(("name", "make", "make_x"), MODE_DEPENDENT, ids=IDS)
def test_a_chosen_mode_or_no_gradients_keeps_it_silent(
    name: str, make: Callable[[], Any], make_x: Callable[[], torch.Tensor]
) -> None:
    layer, x = make(), make_x()
    needs_batch = name.startswith("BatchNorm")
    nn.training(lambda m: _call(m, x), layer)  # training mode
    with nn.evaluating():  # evaluation mode, chosen explicitly
        _call(layer, x)
    _call(layer, x, training=False)  # chosen per call
    if not needs_batch or x.shape[0] > 1:
        _call(layer, x, training=True)
    with torch.no_grad():  # no gradients recorded
        _call(layer, x)
    with torch.inference_mode():
        _call(layer, x.detach())
    # Nothing requires grad: neither the input nor the layer's parameters.
    frozen = dp.replace_parameters(layer, [p.detach() for p in dp.flatten_parameters(layer)])
    _call(frozen, x.detach())


def test_only_the_layers_parameters_requiring_grad_also_warn() -> None:
    """The input needs no grad, the parameters do: gradients are recorded, so it warns."""
    bn = dp.sample(nn.BatchNorm1dSpec(3))
    with pytest.warns(nn.ModeWarning, match="BatchNorm1d"):
        bn(torch.randn(4, 3))
    mha = dp.sample(nn.MultiheadAttentionSpec(4, 2, dropout=0.1))
    x = torch.randn(3, 4)
    with pytest.warns(nn.ModeWarning, match="MultiheadAttention"):
        mha(x, x, x)
    lstm = dp.sample(nn.LSTMSpec(3, 4, num_layers=2, dropout=0.2))
    with pytest.warns(nn.ModeWarning, match="LSTM"):
        lstm(torch.randn(5, 3))
    frozen = dp.replace_parameters(lstm, [p.detach() for p in dp.flatten_parameters(lstm)])
    h0 = torch.zeros(2, 4, requires_grad=True)  # an initial state that requires grad
    with pytest.warns(nn.ModeWarning, match="LSTM"):
        frozen(torch.randn(5, 3), (h0, torch.zeros(2, 4)))


SILENT: list[tuple[str, Callable[[], Any], Callable[[], torch.Tensor]]] = [
    ("Dropout p=0", lambda: dp.sample(nn.DropoutSpec(0.0)), _x(4, 3)),
    ("Dropout2d p=0", lambda: dp.sample(nn.Dropout2dSpec(0.0)), _x(2, 3, 2, 2)),
    (
        "BatchNorm1d without running stats",
        lambda: dp.sample(nn.BatchNorm1dSpec(3, track_running_stats=False)),
        _x(4, 3),
    ),
    (
        "InstanceNorm1d without running stats",
        lambda: dp.sample(nn.InstanceNorm1dSpec(3)),
        _x(2, 3, 5),
    ),
    ("LayerNorm", lambda: dp.sample(nn.LayerNormSpec(3)), _x(4, 3)),
    ("GroupNorm", lambda: dp.sample(nn.GroupNormSpec(1, 3)), _x(4, 3)),
    ("RNN dropout=0", _rnn(nn.RNNSpec(3, 4, num_layers=2)), _x(5, 2, 3)),
    (
        "MultiheadAttention dropout=0",
        lambda: dp.sample(nn.MultiheadAttentionSpec(4, 2)),
        _x(3, 2, 4),
    ),
    (
        "TransformerEncoderLayer dropout=0",
        lambda: dp.sample(nn.TransformerEncoderLayerSpec(4, 2, 8, dropout=0.0)),
        _x(3, 2, 4),
    ),
]


@pytest.mark.parametrize(("name", "make", "make_x"), SILENT, ids=[c[0] for c in SILENT])
def test_a_layer_that_does_not_depend_on_the_mode_is_silent(
    name: str, make: Callable[[], Any], make_x: Callable[[], torch.Tensor]
) -> None:
    x = make_x()
    assert x.requires_grad and torch.is_grad_enabled()  # gradients are recorded
    _call(make(), x)


def test_an_lstm_with_one_layer_has_no_dropout_to_forget() -> None:
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        spec = nn.LSTMSpec(3, 4, dropout=0.5)  # torch.nn's own warning, at construction
    dp.sample(spec)(torch.randn(5, 3, requires_grad=True))


def test_the_warning_is_shown_once_per_layer_type_and_place_by_default() -> None:
    drop = dp.sample(nn.DropoutSpec(0.5))
    bn = dp.sample(nn.BatchNorm1dSpec(3))
    x = torch.randn(4, 3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default rule for UserWarning
        for _ in range(3):
            drop(x)  # one place, one type: once
            bn(x)  # another type at another place: once
        for _ in range(2):
            drop(x)  # another place: once more
    assert [type(w.message) for w in caught] == [nn.ModeWarning] * 3
    names = [str(w.message).split()[0] for w in caught]
    assert names == ["Dropout", "BatchNorm1d", "Dropout"]


def test_a_forgotten_training_pass_in_a_user_model_is_reported_at_the_users_line() -> None:
    class Net(dp.Parameterized):
        lin: nn.Linear
        seq: nn.Sequential

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return self.seq(self.lin(x))  # the Dropout runs inside Sequential

    net = Net(
        dp.sample(nn.LinearSpec(3, 4)),
        dp.sample(nn.SequentialSpec(nn.DropoutSpec(0.2), nn.LinearSpec(4, 1))),
    )
    with pytest.warns(nn.ModeWarning, match="Dropout") as caught:
        net(torch.randn(5, 3)).sum()
    assert caught[0].filename == __file__
    line = pathlib.Path(__file__).read_text().splitlines()[caught[0].lineno - 1]
    assert "return self.seq(self.lin(x))" in line


def test_evaluating_and_training_nest() -> None:
    bn = dp.sample(nn.BatchNorm1dSpec(3))
    x = torch.randn(6, 3) * 2 + 1
    drop = dp.sample(nn.DropoutSpec(0.5))
    ones = torch.ones(100, requires_grad=True)

    def evaluate_inside(m: Any) -> torch.Tensor:
        with nn.evaluating():
            assert not nn.is_training()
            assert torch.equal(drop(ones), ones)  # no dropout
            return m(x)  # the running statistics, no update

    y, same = nn.training(evaluate_inside, bn)
    assert same is bn
    with nn.evaluating():
        torch.testing.assert_close(y, bn(x))
        # A training pass inside an evaluating block trains.
        _, updated = nn.training(lambda m: m(x), bn)
        assert not nn.is_training()
    assert updated.num_batches_tracked.item() == 1
    assert not nn.is_training()


def test_evaluating_is_reset_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), nn.evaluating():
        raise RuntimeError("boom")
    with pytest.warns(nn.ModeWarning):
        dp.sample(nn.DropoutSpec(0.5))(torch.ones(3, requires_grad=True))
