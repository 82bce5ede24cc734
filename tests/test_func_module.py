"""diffprog.func.as_module: a torch.nn.Module view of a model (torch.export of a digits CNN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import diffprog as dp
from diffprog import Parameterized
from diffprog.examples.digits import cnn_spec
from diffprog.func import as_module
from diffprog.nn import BatchNorm1d, BatchNorm1dSpec, Linear, LinearSpec, from_torch
from diffprog.optim import Adam, run_step


class Net(Parameterized):
    encoder: Linear
    norm: BatchNorm1d
    decoder: Linear  # tied to encoder in one test

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.encoder(x)))


def net(tied: bool = False) -> Net:
    gen = torch.Generator().manual_seed(0)
    encoder = dp.sample(LinearSpec(3, 3), generator=gen)
    norm = dp.sample(BatchNorm1dSpec(3), generator=gen)
    decoder = encoder if tied else dp.sample(LinearSpec(3, 3), generator=gen)
    return Net(encoder, norm, decoder)


def test_as_module_parameters_are_the_models_own() -> None:
    model = net()
    module = as_module(model)
    ours = dp.named_parameters(model)
    theirs = list(module.named_parameters())
    assert [name for name, _ in theirs] == [name for name, _ in ours]
    assert all(a is b for (_, a), (_, b) in zip(theirs, ours, strict=True))
    assert list(module.state_dict()) == list(dp.state_dict(model))
    buffers = dict(module.named_buffers())
    assert list(buffers) == ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    assert buffers["norm.running_mean"] is model.norm.running_mean
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(module(x), model(x))


def test_as_module_tied_parameter_is_registered_under_each_key() -> None:
    model = net(tied=True)
    module = as_module(model)
    assert list(module.state_dict()) == list(dp.state_dict(model))
    assert "decoder.weight" in module.state_dict()
    assert module.decoder.weight is module.encoder.weight is model.encoder.weight
    # named_parameters names a tied parameter once, by its first key, as diffprog does.
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in dp.named_parameters(model)]


def test_as_module_exports_a_trained_digits_cnn() -> None:
    gen = torch.Generator().manual_seed(0)
    model = dp.sample(cnn_spec(channels=(4, 8), hidden=16), generator=gen)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    opt = Adam.init(model)
    for _ in range(3):
        model, opt = run_step(model, opt, F.cross_entropy(model(x), y), 0.01)
    exported = torch.export.export(as_module(model), (x,))
    specs = exported.graph_signature.input_specs
    lifted = [s.target for s in specs if s.kind == torch.export.graph_signature.InputKind.PARAMETER]
    assert lifted == [name for name, _ in dp.named_parameters(model)]
    for name, p in dp.named_parameters(model):
        assert torch.equal(exported.state_dict[name], p)
    new_x = torch.rand(16, 1, 8, 8, generator=gen)  # exported for this batch size
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(new_x), model(new_x))


def test_the_reverse_of_as_module_for_a_layer_stack_is_from_torch() -> None:
    """A torch.nn module whose structure is a diffprog layer stack (here torch's form of the
    digits CNN) becomes a model with from_torch; as_module of that model is a module with the
    same state_dict (keys, order of parameters, values) computing the same, and exports."""
    tnn = torch.nn
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = tnn.Sequential(
            tnn.Conv2d(1, 4, 3, padding=1),
            tnn.ReLU(),
            tnn.Conv2d(4, 8, 3, padding=1),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Flatten(),
            tnn.Linear(8 * 4 * 4, 16),
            tnn.ReLU(),
            tnn.Linear(16, 10),
        )
    model = from_torch(module)
    like = dp.sample(cnn_spec(channels=(4, 8), hidden=16))  # the diffprog layer stack
    assert list(dp.state_dict(model)) == list(dp.state_dict(like)) == list(module.state_dict())
    back = as_module(model)
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in module.named_parameters()]
    for (name, a), b in zip(module.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(x), module(x))
        exported = torch.export.export(back, (x,))
        torch.testing.assert_close(exported.module()(x), module(x))
