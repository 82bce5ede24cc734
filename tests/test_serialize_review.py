"""Regressions from the review of issue 10's serialization (each failed before its fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import diffprog as dp
from diffprog.nn import Linear, LinearSpec
from diffprog.optim import SGD, Adam, Adamax, AdamW, RMSprop, run_step


class Aff(dp.Parameterized):
    """A hand-written instance listing both of its tensors."""

    w: torch.Tensor
    b: torch.Tensor

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.w, self.b]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Aff:
        return Aff(stream.next_parameter(), stream.next_parameter())


class Hidden(dp.Parameterized):
    """A hand-written instance holding a buffer it does not list."""

    w: torch.Tensor
    scale: torch.Tensor

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.w]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Hidden:
        return Hidden(stream.next_parameter(), self.scale)


def _aff(w: float, b: float) -> Aff:
    return Aff(dp.make_independent(torch.full((2,), w)), dp.make_independent(torch.full((2,), b)))


@pytest.mark.parametrize("listed", ["frozen", "buffer"])
def test_a_frozen_tensor_or_buffer_listed_by_a_hand_written_instance_is_loaded(
    tmp_path: Path, listed: str
) -> None:
    # It was left with the skeleton's value, silently, by a strict load.
    def build(w: float, b: float) -> Aff:
        if listed == "frozen":
            return dp.freeze(_aff(w, b), "b")
        return Aff(dp.make_independent(torch.full((2,), w)), torch.full((2,), b))

    model, skeleton = build(2.0, 3.0), build(0.0, 0.0)
    path = tmp_path / "aff.safetensors"
    dp.save_params(model, path)
    for back in (
        dp.load_params(skeleton, path),
        dp.load_state_dict(skeleton, dp.state_dict(model)),
    ):
        assert torch.equal(back.b, torch.full((2,), 3.0)) and torch.equal(back.w, model.w)
        assert type(back.b) is type(model.b) and isinstance(back.w, dp.Parameter)
    assert torch.equal(skeleton.b, torch.zeros(2))  # the skeleton is unchanged


def test_a_tensor_a_hand_written_instance_holds_without_listing_is_refused() -> None:
    # It was left out of the state dict (and so out of every file) without a word.
    model = Hidden(dp.make_independent(torch.ones(2)), torch.full((2,), 5.0))
    with pytest.raises(dp.InstanceError, match="without listing it"):
        dp.state_dict(model)
    with pytest.raises(dp.InstanceError, match="without listing it"):
        dp.load_state_dict(model, {"w": torch.zeros(2)}, strict=False)


def test_metadata_values_equal_to_a_key_are_not_aliases(tmp_path: Path) -> None:
    # Every metadata entry whose value was a tensor key was read as an alias, so a file with
    # such metadata gained keys (and failed a strict load).
    layer = dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "layer.safetensors"
    dp.save_params(layer, path, metadata={"init": "weight", "notes": "bias"})
    assert sorted(dp.load_tensors(path)) == ["bias", "weight"]
    back = dp.load_params(dp.sample(LinearSpec(3, 2), device="meta"), path)
    assert torch.equal(back.weight, layer.weight)


def test_a_tied_file_written_by_safetensors_save_model_still_loads(tmp_path: Path) -> None:
    # The alias fallback kept for save_model's {dropped key: kept key} entries.
    import safetensors.torch

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(2, 2, bias=False)
            self.b = torch.nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

    module = Tied()
    path = tmp_path / "tied.safetensors"
    safetensors.torch.save_model(module, str(path))

    class Ours(dp.Parameterized):
        a: Linear
        b: Linear

    w = dp.make_independent(torch.zeros(2, 2))
    skeleton = Ours(Linear(w, None), Linear(w, None))
    back = dp.load_params(skeleton, path)
    assert torch.equal(back.a.weight, module.a.weight.detach()) and back.a.weight is back.b.weight


@pytest.mark.parametrize(
    ("ours", "theirs", "settings"),
    [
        (Adam, torch.optim.Adam, {}),
        (AdamW, torch.optim.AdamW, {}),
        (SGD, torch.optim.SGD, {"momentum": 0.9}),
        (RMSprop, torch.optim.RMSprop, {"momentum": 0.9}),
        (Adamax, torch.optim.Adamax, {}),
    ],
)
def test_load_optimizer_state_dict_copies_the_skeletons_state_so_a_donating_step_leaves_it(
    ours: Any, theirs: Any, settings: dict[str, Any]
) -> None:
    # A parameter torch had no state for kept the skeleton's own state tensors, which a
    # donating optimizer then updated in place.
    gen = torch.Generator().manual_seed(0)

    class Two(dp.Parameterized):
        a: Linear
        b: Linear

    model = Two(
        dp.sample(LinearSpec(2, 2), generator=gen), dp.sample(LinearSpec(2, 2), generator=gen)
    )
    params = dp.flatten_parameters(model)
    topt = theirs(params, lr=0.1, **settings)
    x = torch.randn(4, 2, generator=gen)
    (model.a(x) ** 2).sum().backward()  # only a has a gradient: b gets no state in torch
    topt.step()
    skeleton = ours.init(model, donate=True, **settings)
    kinds = type(skeleton).declaration().state
    before = {k: [t.clone() for t in getattr(skeleton, k) if t is not None] for k in kinds}
    loaded = dp.load_optimizer_state_dict(skeleton, model, topt.state_dict())
    for k in kinds:
        pairs = zip(getattr(loaded, k), getattr(skeleton, k), strict=True)
        assert all(a is not b for a, b in pairs if a is not None)
    loss = (model.a(x) ** 2).sum() + (model.b(x) ** 2).sum()
    run_step(model, loaded, loss, 0.1)
    for k in kinds:
        after = [t for t in getattr(skeleton, k) if t is not None]
        assert all(torch.equal(a, b) for a, b in zip(before[k], after, strict=True))
