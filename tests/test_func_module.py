"""diffprog.func.as_module: a torch.nn.Module view of a model (torch.export of a digits CNN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import diffprog as dp
from diffprog import Parameterized
from diffprog.examples.digits import cnn_spec
from diffprog.func import as_module
from diffprog.nn import BatchNorm1d, BatchNorm1dSpec, Linear, LinearSpec
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
