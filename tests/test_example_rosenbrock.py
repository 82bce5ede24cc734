"""The Rosenbrock example: GD crawls, Adam arrives, the in-place Adam equals the pure one."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch
from torch.testing import assert_close

from diffprog.examples import rosenbrock


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[float, rosenbrock.Coord, rosenbrock.Path]]:
    return rosenbrock.run_all(rosenbrock.STEPS)


def distance(coord: rosenbrock.Coord) -> float:
    return math.hypot(1 - float(coord.x.detach()), 1 - float(coord.y.detach()))


def test_gd_crawls_and_adam_arrives(
    results: dict[str, tuple[float, rosenbrock.Coord, rosenbrock.Path]],
) -> None:
    gd, adam = results["GD"][1], results["Adam"][1]
    assert distance(gd) > 0.3  # still in the valley, far from (1, 1)
    assert float(rosenbrock.rosenbrock(gd).detach()) < float(
        rosenbrock.rosenbrock(rosenbrock.start()).detach()
    )
    assert distance(adam) < 0.1
    assert len(results["GD"][2]) == rosenbrock.STEPS + 1


def test_in_place_adam_lands_on_the_pure_numbers(
    results: dict[str, tuple[float, rosenbrock.Coord, rosenbrock.Path]],
) -> None:
    pure, in_place = results["Adam"], results["Adam, in place (torch.optim.Adam)"]
    assert_close(torch.tensor(in_place[2]), torch.tensor(pure[2]), rtol=1e-12, atol=1e-12)


def test_plot_and_table(
    results: dict[str, tuple[float, rosenbrock.Coord, rosenbrock.Path]], tmp_path: pathlib.Path
) -> None:

    file = tmp_path / "paths.png"
    assert rosenbrock.plot(results, file)
    assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = rosenbrock.table(results, rosenbrock.STEPS)
    assert all(name in text for name in results)


def test_main_saves_where_it_says(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:

    file = tmp_path / "out.png"
    rosenbrock.main([str(file), "--steps", "20"])
    out = capsys.readouterr().out
    assert f"Plot saved to {file.resolve()}" in out
    assert "Adam in place vs pure" in out
    assert file.exists()


def test_main_without_matplotlib(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.chdir(tmp_path)
    rosenbrock.main(["--steps", "5"])
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out
    assert not (tmp_path / rosenbrock.DEFAULT_PLOT).exists()
