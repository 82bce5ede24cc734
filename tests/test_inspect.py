"""Issue 11, inspecting: ``summary``, ``tree_equal``/``allclose``, and ``repr`` folding."""

from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Any, NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import diffprog as dp
import diffprog.nn as dnn
from diffprog._frozen import Frozen
from diffprog.nn import Identity, Linear, LinearSpec


def param(*shape: int, value: float = 0.0, dtype: torch.dtype = torch.float32) -> dp.Parameter:
    return dp.make_independent(torch.full(shape, float(value), dtype=dtype))


class Heads(NamedTuple):
    mean: Linear
    log_std: Linear


class Policy(dp.Parameterized):
    trunk: tuple[Linear, ...]
    heads: Heads
    extras: dict[str, Any]
    branch: Linear | Identity  # a sum type: the value picks the branch
    norm: dnn.BatchNorm1d
    scale: float = 1.0


class Cell(dp.Parameterized):
    """A hand-written instance (a dataclass: shown and compared by its fields)."""

    weight_ih: dp.Parameter
    weight_hh: dp.Parameter
    hidden: int = 2

    def flatten_parameters(self) -> list[Any]:
        return [self.weight_hh, self.weight_ih]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Cell:
        weight_hh = stream.next_parameter()
        weight_ih = stream.next_parameter()
        return Cell(weight_ih, weight_hh, self.hidden)


class Foreign:
    """A class we do not own, registered by hand (not a dataclass)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b


dp.register_parameterized(
    Foreign,
    flatten=lambda f: [f.a, f.b],
    replace=lambda f, s: Foreign(s.next_parameter(), s.next_parameter()),
)


def linear(i: int, o: int, seed: int = 0, device: str | None = None) -> Linear:
    return dp.sample(LinearSpec(i, o), generator=torch.Generator().manual_seed(seed), device=device)


def policy(seed: int = 0, device: str | None = None) -> Policy:
    """Every odd structure at once: a tuple, a NamedTuple, a nested dict with a tie and a frozen
    parameter, a sum-type field, buffers (BatchNorm), a hand-written and a registered instance."""
    trunk = (linear(3, 4, seed, device), linear(4, 4, seed + 1, device))
    frozen = Frozen(param(2, value=3.0).to(device or "cpu"))
    return Policy(
        trunk=trunk,
        heads=Heads(linear(4, 2, seed + 2, device), linear(4, 2, seed + 3, device)),
        extras={
            "tied": trunk[0].weight,  # the same Parameter as trunk.0.weight
            "inner": {"frozen": frozen, "cell": Cell(param(2, 3), param(2, 2))},
            "foreign": Foreign(param(1), param(5)),
        },
        branch=dp.sample(dnn.IdentitySpec()),
        norm=dp.sample(dnn.BatchNorm1dSpec(4), device=device),
    )


# --- summary -----------------------------------------------------------------------------------


def test_summary_lists_every_tensor_with_its_path_layer_kind_and_counts_ties_once() -> None:
    model = policy()
    s = dp.summary(model)
    by_path = {row.path: row for row in s.rows}
    # one row per tensor and path, in walk (flatten) order, state_dict-style paths
    expected = [path for path, leaf in dp.walk(model) if isinstance(leaf, torch.Tensor)]
    assert [row.path for row in s.rows] == expected
    assert by_path["trunk.0.weight"].layer == "trunk.0"
    assert by_path["trunk.0.weight"].layer_type == "Linear"
    assert by_path["heads.mean.bias"].layer_type == "Linear"
    assert by_path["extras.tied"].tied_to == "trunk.0.weight"
    assert by_path["extras.tied"].layer_type == "Policy"  # the closest layer above a dict
    assert by_path["extras.inner.frozen"].kind == "frozen"
    assert by_path["extras.inner.cell.weight_ih"].layer_type == "Cell"
    assert by_path["extras.foreign.1"].layer_type == "Foreign"
    assert by_path["extras.foreign.1"].shape == (5,)
    assert by_path["norm.running_mean"].kind == "buffer"
    assert by_path["norm.num_batches_tracked"].dtype == torch.int64
    assert by_path["norm.num_batches_tracked"].nbytes == 8
    # totals: each tensor once (the tie counted at its first path)
    params = dp.flatten_parameters(model)
    assert s.trainable_parameters == sum(p.numel() for p in params)
    assert s.frozen_parameters == 2
    assert s.total_parameters == s.trainable_parameters + 2
    assert s.buffer_elements == 4 + 4 + 1
    assert s.parameter_bytes == 4 * s.total_parameters
    assert s.buffer_bytes == 4 * 8 + 8
    assert s.total_bytes == s.parameter_bytes + s.buffer_bytes


def test_summary_counts_match_torch_modules_parameters_and_buffers() -> None:
    spec = dnn.TransformerEncoderSpec(dnn.TransformerEncoderLayerSpec(16, 2, 32), 3)
    ours = dp.sample(spec)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32)
    theirs = torch.nn.Sequential(
        torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False),
        torch.nn.BatchNorm1d(7),
    )
    s = dp.summary((ours, dp.sample(dnn.BatchNorm1dSpec(7))))
    assert s.total_parameters == sum(p.numel() for p in theirs.parameters())
    assert s.buffer_elements == sum(b.numel() for b in theirs.buffers())
    memory = sum(t.numel() * t.element_size() for t in [*theirs.parameters(), *theirs.buffers()])
    assert s.total_bytes == memory
    # the paths are torch's state_dict keys (the TransformerEncoder's, inside our tuple "0.")
    torch_keys = ["0." + k for k in theirs[0].state_dict()]
    assert [row.path for row in s.rows if row.path.startswith("0.")] == torch_keys


def test_summary_of_a_meta_model_reads_no_memory_and_gives_the_materialised_size() -> None:
    meta = policy(device="meta")
    real = policy()
    s, r = dp.summary(meta), dp.summary(real)
    assert {row.device.type for row in s.rows} == {"meta", "cpu"}  # Cell, Foreign: cpu
    assert (s.total_parameters, s.total_bytes) == (r.total_parameters, r.total_bytes)
    everything_meta = dp.sample(LinearSpec(1000, 1000), device="meta")
    text = str(dp.summary(everything_meta))
    assert "meta" in text.splitlines()[0] and "3.8 MiB" in text


def test_summary_table_has_a_row_per_tensor_with_totals_and_marks_ties() -> None:
    text = str(dp.summary(policy()))
    lines = text.splitlines()
    assert lines[0].startswith("Policy: ") and "frozen" in lines[0]
    assert lines[1].split() == [
        "Path",
        "Layer",
        "Shape",
        "Dtype",
        "Device",
        "Trainable",
        "Frozen",
        "Buffer",
        "Memory",
    ]
    assert any(line.startswith("extras.tied (tied to trunk.0.weight)") for line in lines)
    assert lines[-1].split()[0] == "Total"
    # aligned: every line of the table has the Memory column ending at the same place
    assert len({len(line) for line in lines[1:] if not line.startswith("extras.tied")}) == 1
    assert repr(dp.summary(policy())) == text  # the REPL shows the table too


def test_summary_leaves_out_the_frozen_and_buffer_columns_when_there_are_none() -> None:
    header = str(dp.summary(linear(2, 2))).splitlines()[1].split()
    assert header == ["Path", "Layer", "Shape", "Dtype", "Device", "Trainable", "Memory"]


def test_summary_depth_groups_rows_by_path_prefix() -> None:
    model = dp.sample(dnn.SequentialSpec(LinearSpec(3, 4), dnn.BatchNorm1dSpec(4)))
    s = dp.summary(model, depth=1)
    _, body, total = s.table()
    assert [cells[0] for cells in body] == ["0", "1"]  # the inline field adds no part
    assert [cells[1] for cells in body] == ["Linear", "BatchNorm1d"]
    assert body[1][2] == "5 tensors" and body[1][3] == "float32, int64"
    assert total == dp.summary(model).table()[2]  # same totals at any depth
    assert [cells[0] for cells in dp.summary(model, depth=0).table()[1]] == [""]
    assert dp.summary(model, depth=0).table()[1][0][1] == "Sequential"
    assert len(dp.summary(model, depth=5).table()[1]) == len(s.rows)
    with pytest.raises(ValueError, match="depth"):
        dp.summary(model, depth=-1)


def test_summary_folds_identical_blocks_into_one_row_per_tensor_torch_style() -> None:
    model = Model(dp.sample(dnn.EmbeddingSpec(10, 8)), blocks(24), linear(8, 2))
    s = dp.summary(model)
    _, body, total = s.table()
    paths = [cells[0] for cells in body]
    assert paths == [
        "embed.weight",
        "layers.0-23.attn.weight",
        "layers.0-23.attn.bias",
        "layers.0-23.mlp.0-1.weight",  # the pair inside each block is folded too
        "layers.0-23.mlp.0-1.bias",
        "layers.0-23.norm.weight",
        "layers.0-23.norm.bias",
        "head.weight",
        "head.bias",
    ]
    attn = body[1]
    assert attn[1:5] == ["24 x Linear", "[8, 8]", "float32", "cpu"]
    assert attn[5] == f"{24 * 64:,}"  # the 24 tensors' elements together
    assert body[3][1] == "48 x Linear" and body[3][5] == f"{48 * 64:,}"
    assert len(s.rows) == 1 + 24 * 8 + 2  # rows keep every tensor
    unfolded = dp.summary(model, fold=False).table()
    assert len(unfolded[1]) == len(s.rows) and unfolded[2] == total
    _, by_block, _ = dp.summary(model, depth=2).table()
    assert [cells[:3] for cells in by_block[1:2]] == [["layers.0-23", "24 x Block", "192 tensors"]]


def test_summary_folds_only_items_alike_in_kind_shape_and_ties() -> None:
    layers = [linear(8, 8, seed=i) for i in range(10)]
    layers[3] = linear(8, 4)  # another shape
    frozen = {i: dataclasses.replace(layers[i], bias=Frozen(layers[i].bias)) for i in (5, 6)}
    layers[5], layers[6] = frozen[5], frozen[6]
    layers[8] = layers[7]  # a tie: the same layer twice
    _, body, _ = dp.summary(tuple(layers), depth=1).table()
    assert [cells[0] for cells in body] == ["0-2", "3", "4", "5-6", "7", "8", "9"]
    assert body[3][1] == "2 x Linear" and body[5][2] == "2 tensors (2 tied)"
    p = param(3)
    _, body, _ = dp.summary([p, p, p, param(3)], depth=1).table()
    assert [cells[0] for cells in body] == ["0", "1-2", "3"]  # the tied two, then another
    assert body[1][2] == "[3] (2 tied)" and body[1][5] == "-"


def test_summary_group_of_a_tie_counts_it_once() -> None:
    w = param(3, 3)
    s = dp.summary({"a": {"x": w, "y": w}, "b": {"z": w}}, depth=1)
    _, body, _ = s.table()
    assert [cells[0] for cells in body] == ["a", "b"]
    assert body[0][5] == "9" and body[1][5] == "-"


def test_summary_of_hand_written_instances_names_their_tensors() -> None:
    s = dp.summary({"cell": Cell(param(2, 3), param(2, 2)), "f": Foreign(param(1), param(2))})
    assert [(row.path, row.layer_type) for row in s.rows] == [
        ("cell.weight_hh", "Cell"),  # the instance's own order, named by its fields
        ("cell.weight_ih", "Cell"),
        ("f.0", "Foreign"),
        ("f.1", "Foreign"),
    ]


def test_summary_of_an_empty_model() -> None:
    s = dp.summary({})
    assert s.rows == () and s.total_parameters == 0 and s.total_bytes == 0
    assert str(s).splitlines()[-1].split() == ["Total", "0", "0", "B"]


def test_summary_refuses_a_cycle_naming_its_place() -> None:
    looped: list[Any] = [param(1)]
    looped.append(looped)
    with pytest.raises(dp.CycleError):
        dp.summary(looped)


def test_summary_works_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich now raises ImportError
    s = dp.summary(policy())
    assert "trunk.0.weight" in str(s) and "trunk.0.weight" in s._repr_html_()
    with pytest.raises(ImportError):
        s.__rich__()


def test_summary_renders_with_rich_when_installed() -> None:
    import rich.console as console  # rich is in the test extra: this runs in CI

    out = console.Console(record=True, width=200, color_system=None)
    out.print(dp.summary(policy()))
    text = out.export_text()
    assert "Policy: " in text and "trunk.0.weight" in text and "Total" in text
    assert "norm.running_mean" in text


def test_summary_html_is_a_table_with_escaped_text() -> None:
    page = dp.summary({"<b>": param(2)})._repr_html_()
    assert page.startswith("<table>") and "&lt;b&gt;.0" not in page
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert page.count("<tr>") == 3  # header, one row, totals


# --- tree_equal / allclose -----------------------------------------------------------------------


def test_tree_equal_holds_for_a_copy_and_for_a_replace_with_the_same_parameters() -> None:
    model = policy()
    assert dp.tree_equal(model, model)
    assert dp.tree_equal(model, copy.deepcopy(model))  # new tensors, same values, same ties
    assert dp.tree_equal(model, dp.replace_parameters(model, dp.flatten_parameters(model)))
    assert dp.tree_equal(model, policy())  # sampled again from the same seeds
    assert dp.allclose(model, policy())
    result = dp.tree_equal(model, model)
    assert result.equal and result.path is None and result.reason is None
    assert repr(result) == "Comparison(equal=True)"


def _with_extras(**changes: Any) -> Policy:
    model = policy()
    return dataclasses.replace(model, extras={**model.extras, **changes})


def _swap_trunk_layer(layer: Linear) -> Policy:
    model = policy()
    return dataclasses.replace(model, trunk=(model.trunk[0], layer))


def _value_changed() -> Policy:
    model = policy()
    bumped = dp.make_independent(model.heads.log_std.bias.detach() + 1)
    heads = model.heads._replace(log_std=dataclasses.replace(model.heads.log_std, bias=bumped))
    return dataclasses.replace(model, heads=heads)


# (the other model, the first differing path, words of the reason)
DIFFERENCES: list[tuple[str, Any, str, str]] = [
    ("values", _value_changed, "heads.log_std.bias", "values differ: 2 of 2 elements"),
    ("shape", lambda: _swap_trunk_layer(linear(4, 3)), "trunk[1].weight", "shape [4, 4] vs [3, 4]"),
    (
        "dtype",
        lambda: _swap_trunk_layer(
            dp.sample(LinearSpec(4, 4), dtype=torch.float64, generator=torch.Generator())
        ),
        "trunk[1].weight",
        "dtype torch.float32 vs torch.float64",
    ),
    ("device", lambda: _swap_trunk_layer(linear(4, 4, device="meta")), "trunk[1].weight", "device"),
    (
        "sum-type branch",
        lambda: dataclasses.replace(policy(), branch=linear(1, 1)),
        "branch",
        "type Identity vs Linear",
    ),
    ("static field", lambda: dataclasses.replace(policy(), scale=2.0), "scale", "1.0 vs 2.0"),
    (
        "tuple length",
        lambda: dataclasses.replace(policy(), trunk=policy().trunk[:1]),
        "trunk",
        "length 2 vs 1",
    ),
    ("dict keys", lambda: _with_extras(more=1), "extras", "keys"),
    (
        "dict order",
        lambda: dataclasses.replace(policy(), extras=dict(reversed(policy().extras.items()))),
        "extras",
        "the same keys in another order",
    ),
    (
        "a tie undone",
        lambda: _with_extras(tied=dp.make_independent(policy().trunk[0].weight.detach().clone())),
        "extras['tied']",
        "ties differ: the same tensor as at trunk[0].weight in a, not tied in b",
    ),
    (
        "Parameter vs plain tensor",
        lambda: _with_extras(tied=policy().trunk[0].weight.detach()),
        "extras['tied']",
        "a Parameter vs a plain tensor (constant)",
    ),
    (
        "Frozen vs Parameter",
        lambda: _with_extras(inner={**policy().extras["inner"], "frozen": param(2, value=3.0)}),
        "extras['inner']['frozen']",
        "a frozen parameter (Frozen) vs a Parameter",
    ),
    (
        "hand-written field",
        lambda: _with_extras(
            inner={**policy().extras["inner"], "cell": Cell(param(2, 3), param(2, 2), hidden=3)}
        ),
        "extras['inner']['cell'].hidden",
        "2 vs 3",
    ),
    (
        "registered instance",
        lambda: _with_extras(foreign=Foreign(param(1), param(5, value=1))),
        "extras['foreign'].b",
        "values differ",
    ),
    (
        "buffer",
        lambda: dataclasses.replace(
            policy(), norm=dataclasses.replace(policy().norm, running_mean=torch.ones(4))
        ),
        "norm.running_mean",
        "values differ: 4 of 4 elements",
    ),
]


@pytest.mark.parametrize(
    ("other", "path", "reason"), [d[1:] for d in DIFFERENCES], ids=[d[0] for d in DIFFERENCES]
)
@pytest.mark.parametrize("compare", [dp.tree_equal, dp.allclose])
def test_a_difference_is_reported_at_its_path_with_a_reason(
    compare: Any, other: Any, path: str, reason: str
) -> None:
    result = compare(policy(), other())
    assert not result
    assert result.path == path
    assert reason in (result.reason or "")
    assert f"path={path!r}" in repr(result)
    assert dp.tree_equal(other(), other())  # the other model is a valid model in itself


def test_a_failing_assert_names_the_path_in_pytest_s_message() -> None:
    with pytest.raises(AssertionError) as info:
        assert dp.tree_equal(policy(), _value_changed())
    assert "heads.log_std.bias" in str(info.value) and "values differ" in str(info.value)


def test_the_first_difference_in_flatten_order_is_reported() -> None:
    a = [param(2), param(3)]
    b = [param(2, value=1), param(3, value=1)]
    assert dp.tree_equal(a, b).path == "[0]"
    assert dp.tree_equal(a, b).keys == (("index", 0),)


def test_nan_is_unequal_unless_equal_nan_as_in_torch() -> None:
    a = {"x": torch.tensor([1.0, float("nan")])}
    b = {"x": torch.tensor([1.0, float("nan")])}
    assert not dp.tree_equal(a, b) and not dp.allclose(a, b)
    assert dp.tree_equal(a, b, equal_nan=True) and dp.allclose(a, b, equal_nan=True)
    assert "nan" in (dp.tree_equal(a, b).reason or "")


def test_allclose_compares_integer_and_bool_tensors_exactly() -> None:
    assert not dp.allclose({"i": torch.tensor([1, 2])}, {"i": torch.tensor([1, 3])}, atol=10)
    assert not dp.allclose({"m": torch.tensor([True])}, {"m": torch.tensor([False])}, atol=10)
    small = dp.tree_equal(
        {"u": torch.tensor([3], dtype=torch.uint8)}, {"u": torch.tensor([5], dtype=torch.uint8)}
    )
    assert "largest |a - b| = 2 " in (small.reason or "")  # no unsigned wrap-around


def test_meta_tensors_compare_by_shape_dtype_and_kind_only() -> None:
    a = dp.sample(LinearSpec(3, 2), device="meta")
    b = dp.sample(LinearSpec(3, 2), device="meta")
    assert dp.tree_equal(a, b)
    assert not dp.tree_equal(a, dp.sample(LinearSpec(3, 3), device="meta"))


def test_opaque_static_values_compare_by_equality_or_attributes() -> None:
    class Holder(dp.Parameterized):
        act: Any

    assert dp.tree_equal(Holder(torch.nn.ReLU()), Holder(torch.nn.ReLU()))
    assert not dp.tree_equal(Holder(torch.nn.LeakyReLU(0.1)), Holder(torch.nn.LeakyReLU(0.2)))
    assert not dp.tree_equal(Holder(torch.relu), Holder(torch.tanh))
    assert not dp.tree_equal(Holder(lambda x: x), Holder(lambda x: x))  # two functions
    assert dp.tree_equal(Holder(torch.float32), Holder(torch.float32))


@settings(max_examples=200, deadline=None)
@given(
    a=st.lists(st.floats(-10, 10, width=32) | st.just(float("nan")), min_size=1, max_size=6),
    noise=st.lists(st.floats(-1e-3, 1e-3), min_size=6, max_size=6),
    rtol=st.sampled_from([0.0, 1e-5, 1e-3, 0.1]),
    atol=st.sampled_from([0.0, 1e-8, 1e-4, 1e-2]),
    equal_nan=st.booleans(),
)
def test_allclose_agrees_with_torch_allclose(
    a: list[float], noise: list[float], rtol: float, atol: float, equal_nan: bool
) -> None:
    x = torch.tensor(a)
    y = x + torch.tensor(noise[: len(a)])
    ours = dp.allclose(
        {"w": param(1), "t": x}, {"w": param(1), "t": y}, rtol=rtol, atol=atol, equal_nan=equal_nan
    )
    assert bool(ours) == torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=equal_nan)
    exact = dp.tree_equal({"t": x}, {"t": y}, equal_nan=equal_nan)
    same = bool(((x == y) | (x.isnan() & y.isnan() & equal_nan)).all())
    assert bool(exact) == same


# --- repr folding ----------------------------------------------------------------------------


class Block(dp.Parameterized):
    attn: Linear
    mlp: tuple[Linear, Linear]
    norm: dnn.LayerNorm


def blocks(n: int, width: int = 8) -> Any:
    spec = LinearSpec(width, width)
    return tuple(
        Block(
            dp.sample(spec), (dp.sample(spec), dp.sample(spec)), dp.sample(dnn.LayerNormSpec(width))
        )
        for _ in range(n)
    )


class Model(dp.Parameterized):
    embed: dnn.Embedding
    layers: tuple[Block, ...]
    head: Linear


def test_repr_of_24_identical_blocks_shows_one_of_them_torch_style() -> None:
    model = Model(dp.sample(dnn.EmbeddingSpec(10, 8)), blocks(24), linear(8, 2))
    text = repr(model)
    assert "(0-23): 24 x Block(" in text
    # one block shown: attn, its mlp pair (folded too: "(0-1): 2 x Linear"), and the head
    assert text.count("Block(") == 1 and text.count("Linear(") == 3
    assert "(0-1): 2 x Linear(weight=f32[8,8], bias=f32[8])" in text
    assert len(text.splitlines()) < 20
    assert "(0-23)" not in dp.tree_repr(model, fold=False)
    assert dp.tree_repr(model, fold=False).count("Block(") == 24


def test_repr_folds_only_runs_of_the_same_structure() -> None:
    base = blocks(1)[0]
    other_shape = blocks(1, width=4)[0]
    other_dtype = dataclasses.replace(base, attn=dp.sample(LinearSpec(8, 8), dtype=torch.float64))
    frozen_attn = dataclasses.replace(
        base, attn=dataclasses.replace(base.attn, bias=Frozen(base.attn.bias))
    )
    items = (base, base, other_shape, base, other_dtype, frozen_attn, frozen_attn, frozen_attn)
    text = dp.tree_repr(items)
    assert "(0-1): 2 x Block(" in text and "(2): Block(" in text and "(3): Block(" in text
    assert "(4): Block(" in text and "(5-7): 3 x Block(" in text
    assert "f32[4,4]" in text and "f64[8,8]" in text and "bias=frozen f32[8]" in text


def test_repr_tells_parameters_buffers_and_frozen_parameters_apart() -> None:
    text = repr(policy())
    assert "'frozen': frozen f32[2]" in text  # a frozen parameter
    assert "running_mean=const f32[4]" in text  # a buffer
    assert "'tied': f32[4,3]" in text  # a Parameter


def test_a_short_sequence_is_not_folded() -> None:
    pair = (param(3), param(3))
    assert dp.tree_repr(pair) == "(f32[3], f32[3])"
    many = [param(3) for _ in range(40)]
    assert dp.tree_repr(many) == "[(0-39): 40 x f32[3]]"
    assert dp.tree_repr([*many, param(2)]) == "[(0-39): 40 x f32[3], (40): f32[2]]"


@pytest.mark.parametrize("width", [50, 72, 88, 100, 120])
def test_repr_stays_within_its_width(width: int) -> None:
    deep: Any = param(2)
    for i in range(40):
        deep = {f"a_rather_long_key_number_{i}": deep, "n": i}
    models = [
        Model(dp.sample(dnn.EmbeddingSpec(10, 8)), blocks(24), linear(8, 2)),
        dp.sample(
            dnn.TransformerEncoderSpec(dnn.TransformerEncoderLayerSpec(64, 4), 6), device="meta"
        ),
        policy(),
        deep,
        {"k" * 200: param(2), "v": "x" * 500},
    ]
    for model in models:
        text = dp.tree_repr(model, width=width)
        assert max(len(line) for line in text.splitlines()) <= width, text


def test_repr_of_a_tie_and_a_hand_written_instance_in_a_folded_list() -> None:
    cell = Cell(param(2, 3), param(2, 2))
    text = dp.tree_repr([cell] * 30)
    assert text == "[(0-29): 30 x Cell(weight_ih=f32[2,3], weight_hh=f32[2,2], hidden=2)]"


def test_a_sub_value_shared_at_many_paths_is_rendered_and_compared_once() -> None:
    shared: Any = param(1)
    for _ in range(16):  # 3**16 paths: visiting each would not finish
        shared = [shared, shared, shared]
    assert dp.tree_repr(shared).count("f32[1]") == 3
    assert dp.tree_equal(shared, shared)
    same: Any = param(1)
    changed: Any = param(1, value=1)
    for _ in range(16):
        same, changed = [same, same, same], [changed, changed, changed]
    assert dp.tree_equal(shared, same)
    assert dp.tree_equal(shared, changed).path == "[0]" * 16


@pytest.mark.cuda
def test_cuda_models_summarise_compare_and_print_their_device() -> None:
    model = policy(device="cuda")
    s = dp.summary(model)
    assert {row.device.type for row in s.rows} == {"cuda", "cpu"}  # Cell, Foreign stay on cpu
    assert s.total_bytes == dp.summary(policy()).total_bytes
    assert "cuda:0" in str(s)
    assert dp.tree_equal(model, policy(device="cuda"))
    result = dp.tree_equal(policy(), model)
    assert result.path == "trunk[0].weight" and result.reason == "device cpu vs cuda:0"
    assert "f32[4,3]@cuda:0" in repr(model)
