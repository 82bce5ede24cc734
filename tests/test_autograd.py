"""Independent tensors and gradients (Hasktorch's Torch.Autograd)."""

from __future__ import annotations

import pytest
import torch

import diffprog as dp


def test_parameter_is_torch_parameter_and_independent_tensor_is_the_same_type() -> None:
    assert dp.Parameter is torch.nn.Parameter
    assert dp.IndependentTensor is dp.Parameter
    p = dp.make_independent(torch.ones(2))
    assert isinstance(p, torch.nn.Parameter)
    # arithmetic works on it directly and gives ordinary tensors
    assert type(p * 2) is torch.Tensor


def test_make_independent_gives_a_fresh_leaf_cut_from_the_graph() -> None:
    w = dp.make_independent(torch.tensor([1.0, 2.0]))
    derived = w * 3  # part of w's graph
    p = dp.make_independent(derived)
    assert p.is_leaf and p.requires_grad and p.grad_fn is None
    (p.sum()).backward()
    assert w.grad is None  # no gradient flowed back into the graph derived came from
    assert torch.equal(p.detach(), torch.tensor([3.0, 6.0]))


def test_make_independent_leaves_its_input_unchanged() -> None:
    t = torch.ones(3)
    dp.make_independent(t)
    assert not t.requires_grad and type(t) is torch.Tensor


@pytest.mark.parametrize("bad", [torch.arange(3), torch.zeros(2, dtype=torch.bool)])
def test_make_independent_rejects_dtypes_without_gradients(bad: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="floating point or complex"):
        dp.make_independent(bad)


def test_make_independent_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        dp.make_independent([1.0, 2.0])  # type: ignore[arg-type]


def test_to_dependent_is_usable_in_expressions_and_keeps_the_graph() -> None:
    p = dp.make_independent(torch.tensor([2.0]))
    y = dp.to_dependent(p) ** 2
    (g,) = dp.grad(y.sum(), [p])
    assert torch.equal(g, torch.tensor([4.0]))


def test_grad_follows_the_order_of_params_and_gives_zeros_for_unused() -> None:
    a = dp.make_independent(torch.tensor([1.0, 2.0]))
    b = dp.make_independent(torch.tensor(3.0))
    unused = dp.make_independent(torch.zeros(2, 2))
    loss = (a * b).sum()
    ga, gunused, gb = dp.grad(loss, [a, unused, b])
    assert torch.equal(ga, torch.tensor([3.0, 3.0]))
    assert torch.equal(gb, torch.tensor(3.0))
    assert gunused is not None and torch.equal(gunused, torch.zeros(2, 2))


def test_grad_matches_torch_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    w = dp.make_independent(torch.randn(4, 3, generator=gen))
    x = torch.randn(5, 3, generator=gen)
    loss = torch.tanh(x @ w.T).pow(2).mean()
    (ours,) = dp.grad(loss, [w])
    (theirs,) = torch.autograd.grad(torch.tanh(x @ w.T).pow(2).mean(), [w])
    torch.testing.assert_close(ours, theirs)


def test_grad_of_a_loss_without_graph_is_all_zeros() -> None:
    p = dp.make_independent(torch.ones(3))
    assert torch.equal(dp.grad(torch.tensor(1.5), [p])[0], torch.zeros(3))


def test_grad_treats_tensors_that_do_not_require_grad_as_unused() -> None:
    p = dp.make_independent(torch.ones(2))
    frozen = torch.ones(2)
    gp, gfrozen = dp.grad((p * frozen).sum(), [p, frozen])
    assert torch.equal(gp, torch.ones(2)) and torch.equal(gfrozen, torch.zeros(2))


def test_grad_rejects_a_non_scalar_loss() -> None:
    p = dp.make_independent(torch.ones(2))
    with pytest.raises(dp.DiffprogError, match=r"scalar loss.*\(2,\).*mean\(\)"):
        dp.grad(p * 2, [p])


def test_grad_with_create_graph_gives_second_derivatives() -> None:
    x = dp.make_independent(torch.tensor(3.0))
    (dx,) = dp.grad(x**3, [x], create_graph=True)
    (ddx,) = dp.grad(dx, [x])
    assert dx.item() == 27.0 and ddx.item() == 18.0


def test_grad_with_no_params_is_empty() -> None:
    assert dp.grad(torch.tensor(1.0, requires_grad=True) * 2, []) == []


# --- grad keeps the graph (Hasktorch's keep_graph = true); run_step frees it ----------------


def _model_and_loss() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = {
        "w": dp.make_independent(torch.randn(4, 3, generator=gen)),
        "b": dp.make_independent(torch.randn(4, generator=gen)),
        "unused": dp.make_independent(torch.zeros(2)),
    }
    x = torch.randn(5, 3, generator=gen)
    return model, torch.tanh(x @ model["w"].T + model["b"]).square().sum()


def test_grad_twice_on_one_loss_gives_equal_results() -> None:
    model, loss = _model_and_loss()
    params = dp.flatten_parameters(model)
    first = dp.grad(loss, params)
    second = dp.grad(loss, params)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    expected = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    torch.testing.assert_close(first[:2], list(expected[:2]))


def test_grad_then_run_step_on_the_same_loss() -> None:
    from diffprog.optim import Adam, TorchOptimizer, run_step

    for make in (Adam.init, lambda m: TorchOptimizer.init(m, torch.optim.Adam, fused=True)):
        model, loss = _model_and_loss()
        reference, fresh_loss = _model_and_loss()
        grads = dp.grad(loss, dp.flatten_parameters(model))
        stepped, _ = run_step(model, make(model), loss, 0.1)
        expected, _ = run_step(reference, make(reference), fresh_loss, 0.1)
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                dp.flatten_parameters(stepped), dp.flatten_parameters(expected), strict=True
            )
        )
        assert torch.equal(grads[2], torch.zeros(2))


def test_grad_with_retain_graph_false_frees_the_graph() -> None:
    model, loss = _model_and_loss()
    params = dp.flatten_parameters(model)
    dp.grad(loss, params, retain_graph=False)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        dp.grad(loss, params)


def test_run_step_still_frees_the_graph() -> None:
    from diffprog.optim import GD, TorchOptimizer, run_step

    for make in (lambda m: GD(), lambda m: TorchOptimizer.init(m, torch.optim.SGD, lr=0.1)):
        model, loss = _model_and_loss()
        params = dp.flatten_parameters(model)
        run_step(model, make(model), loss, 0.1)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            dp.grad(loss, params)
