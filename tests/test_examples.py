"""The runnable examples run, with tiny budgets, and print what they promise."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import diffprog as dp
from diffprog.examples import char_lm, digits, ensemble, maml, predict, xor_mlp
from diffprog.func import unstack
from diffprog.optim import Adam, run_step


def test_xor_mlp_learns_xor(capsys: pytest.CaptureFixture[str]) -> None:
    xor_mlp.main([])  # Hasktorch's set-up in full: 2-2-1, tanh, GD 0.1, 2000 steps
    out = capsys.readouterr().out
    assert "Iteration: 2000 | Loss:" in out
    predictions = {
        (int(a), int(b)): float(y)
        for a, b, y in re.findall(r"^(\d), (\d) => (-?[\d.]+)$", out, re.MULTILINE)
    }
    assert predictions.keys() == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for (a, b), y in predictions.items():
        assert abs(y - (a ^ b)) < 0.1, out


def test_xor_mlp_model_is_the_hasktorch_shape() -> None:
    model = xor_mlp.train(steps=1, log_every=0)
    assert [tuple(layer.weight.shape) for layer in model[::2]] == [(2, 2), (1, 2)]
    assert model[1] is torch.tanh
    target = xor_mlp.tensor_xor(xor_mlp.INPUTS)
    assert target.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_xor_mlp_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "diffprog.examples.xor_mlp", "--steps", "100"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "Iteration:  100" in result.stdout
    assert "1, 1 =>" in result.stdout


def test_digits_short_run(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:

    plot = tmp_path / "curves.png"
    digits.main(["--epochs", "2", "--plot", str(plot)])
    captured = capsys.readouterr()
    assert "1437 training and 360 test images" in captured.out
    match = re.search(r"test accuracy: ([\d.]+)%", captured.out)
    assert match is not None and float(match.group(1)) > 50.0  # learning, after 2 epochs
    assert f"saved the loss and accuracy plot to {plot}" in captured.out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss=" in captured.err and "test_acc=" in captured.err  # the progress bar
    assert torch.get_num_threads() > 0  # restored, whatever it was


def test_digits_saves_its_model_and_predict_reloads_it_with_the_same_test_accuracy(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "digits.safetensors"
    plot = str(tmp_path / "p.png")
    digits.main(
        ["--epochs", "1", "--seed", "2", "--no-progress", "--plot", plot, "--save", str(saved)]
    )
    trained = re.search(r"test accuracy: ([\d.]+%)", capsys.readouterr().out)
    predict.main([str(saved)])  # the split's seed comes from the file
    out = capsys.readouterr().out
    reloaded = re.search(r"test accuracy: ([\d.]+%) on 360 test images", out)
    assert trained is not None and reloaded is not None
    assert reloaded.group(1) == trained.group(1)
    assert set(safetensors.torch.load_file(saved)) == set(dp.state_dict(predict.load_model(saved)))


def test_digits_split_is_seeded() -> None:

    a, b = digits.load(seed=3), digits.load(seed=3)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(digits.load(seed=4).test_y, a.test_y)


def test_digits_shift_moves_by_at_most_one_pixel() -> None:
    x = torch.zeros(50, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    shifted = digits.shift(x, torch.Generator().manual_seed(0))
    assert torch.equal(shifted.sum((1, 2, 3)), torch.ones(50))
    rows, cols = shifted[:, 0].nonzero()[:, 1], shifted[:, 0].nonzero()[:, 2]
    assert set(rows.tolist()) == {3, 4, 5} and set(cols.tolist()) == {3, 4, 5}


def test_char_lm_short_run(capsys: pytest.CaptureFixture[str]) -> None:
    char_lm.main(["--steps", "3", "--length", "20", "--prompt", "The "])
    captured = capsys.readouterr()
    before = re.search(r"before training: train loss ([\d.]+)", captured.out)
    after = re.search(r"after 3 steps: train loss ([\d.]+)", captured.out)
    assert before is not None and after is not None
    assert float(after.group(1)) < float(before.group(1))
    assert "still tied to the token embedding: True" in captured.out
    assert "lowest held-out loss:" in captured.out
    sample = captured.out.split("sample:\n", 1)[1]
    assert sample.startswith("The ") and len(sample) == 24 + 1  # and print's newline
    assert "loss=" in captured.err  # the progress bar


def test_char_lm_corpus_ships_with_the_package() -> None:
    text = char_lm.default_text()
    assert len(text) > 3000
    vocab = char_lm.Vocabulary.of(text)
    assert vocab.decode(vocab.encode(text[:100])) == text[:100]


def test_char_lm_model_is_causal() -> None:
    spec = char_lm.CharTransformerSpec(vocab_size=10, block_size=8, d_model=16, dim_feedforward=32)
    model = dp.sample(spec, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 10
    # positions before 5 cannot see the change
    with dp.nn.evaluating():
        torch.testing.assert_close(model(tokens)[:, :5], model(changed)[:, :5])
        assert not torch.allclose(model(tokens)[:, 5:], model(changed)[:, 5:])


def test_char_lm_train_keeps_the_best_model() -> None:
    text = char_lm.default_text()
    vocab = char_lm.Vocabulary.of(text)
    data = vocab.encode(text)
    spec = char_lm.CharTransformerSpec(len(vocab.chars), block_size=16, d_model=16, nhead=2)
    generator = torch.Generator().manual_seed(0)
    model = dp.sample(spec, generator=generator)
    before = char_lm.evaluate(model, data[-200:])
    result = char_lm.train(
        model,
        data[:-200],
        data[-200:],
        seconds=0.0,
        steps=4,
        batch_size=4,
        lr=1e-2,
        generator=generator,
        eval_every=1,
        progress=False,
    )
    assert result.steps == 4 and 0 <= result.best_step <= 4
    assert result.best_loss <= before
    assert char_lm.evaluate(result.best, data[-200:]) == pytest.approx(result.best_loss)
    assert result.model.head.weight is result.model.token.weight


def test_ensemble_trains_members_at_once_and_plots_their_spread(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "spread.png"
    ensemble.main([str(plot), "--members", "4"])
    out = capsys.readouterr().out
    assert "4 members" in out and f"Plot saved to {plot.resolve()}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spread = {
        name: float(value) for name, value in re.findall(r"spread \(.*?\) (\w+).*: ([\d.]+)", out)
    }
    # the members agree on the data and disagree away from it
    assert spread["beyond"] > 2 * spread["data"], out


def test_ensemble_members_equal_their_own_training() -> None:
    trained, _ = ensemble.train(members=2, steps=3, seed=1)
    generator = torch.Generator().manual_seed(1)
    x, y = ensemble.data(generator)
    xs, ys = ensemble.bootstrap(x, y, 2, generator)
    for i, member in enumerate(unstack(trained)):
        alone = dp.sample(ensemble.SPEC, generator=torch.Generator().manual_seed(1000 + i))
        optimizer = Adam.init(alone)
        for _ in range(3):
            loss = ensemble.member_loss(alone, xs[i], ys[i])
            alone, optimizer = run_step(alone, optimizer, loss, 1e-2)
        assert dp.allclose(member, alone, rtol=1e-5, atol=1e-6)


def test_maml_short_run(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "maml.png"
    maml.main(["--iterations", "10", "--eval-steps", "2", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "iteration    10 | meta-loss" in out
    assert re.search(r"learned inner learning rate: 0\.0\d+ \(started at 0\.0300\)", out)
    rows = re.findall(r"^\s+(\d) \|\s+([\d.]+) \|\s+([\d.]+)$", out, re.MULTILINE)
    assert [int(k) for k, _, _ in rows] == [0, 1, 2]
    assert f"saved the plot to {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maml_inner_steps_equal_hand_written_sgd_and_carry_the_meta_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    meta = {
        "init": dp.sample(maml.MLPSpec((1, 8, 1)), generator=gen),
        "log_lr": dp.make_independent(torch.tensor(-3.0)),
    }
    x = torch.linspace(-5, 5, 10).reshape(-1, 1)
    y = 2 * torch.sin(x)
    lr = meta["log_lr"].exp()
    adapted = maml.adapt(meta["init"], x, y, lr, 2)[-1]
    params = dp.flatten_parameters(meta["init"])
    by_hand = params
    for _ in range(2):  # p - lr * g, with create_graph: the textbook MAML inner step
        current = dp.replace_parameters(meta["init"], by_hand)
        grads = torch.autograd.grad(
            torch.nn.functional.mse_loss(current(x), y), by_hand, create_graph=True
        )
        by_hand = [p - lr * g for p, g in zip(by_hand, grads, strict=True)]
    expected = dp.replace_parameters(meta["init"], by_hand)
    query = torch.linspace(-4, 4, 7).reshape(-1, 1)
    inputs = [*params, meta["log_lr"]]
    ours = dp.grad(torch.nn.functional.mse_loss(adapted(query), 2 * torch.sin(query)), inputs)
    theirs = dp.grad(torch.nn.functional.mse_loss(expected(query), 2 * torch.sin(query)), inputs)
    torch.testing.assert_close(ours, theirs)
    assert float(ours[-1].abs()) > 0  # the learning rate gets a meta-gradient


def test_maml_meta_trained_init_adapts_better_than_a_plain_one() -> None:
    meta, history = maml.meta_train(iterations=100, log_every=0)
    assert len(history) == 100 and meta["log_lr"].exp().item() != pytest.approx(0.03)
    plain = dp.sample(maml.MLPSpec((1, 40, 40, 1)), generator=torch.Generator().manual_seed(0))
    lr = meta["log_lr"].exp().item()
    ours = maml.evaluate(meta["init"], lr, 3, 20, torch.Generator().manual_seed(1))
    theirs = maml.evaluate(plain, lr, 3, 20, torch.Generator().manual_seed(1))
    assert ours[-1] < 0.9 * theirs[-1]  # after 3 steps on 10 points of a new task
    assert ours[-1] < ours[0]  # adaptation helps the meta-trained init
