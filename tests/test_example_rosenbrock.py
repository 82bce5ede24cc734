"""The Rosenbrock example: GD crawls, Adam arrives, the in-place Adam equals the pure one."""

from __future__ import annotations

import inspect
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


def test_every_path_and_end_point_is_visible_and_in_the_legend(
    results: dict[str, tuple[float, rosenbrock.Coord, rosenbrock.Path]],
) -> None:
    """Issue 8 item 16: GD's path was hidden under Adam's; its end marker was not in the legend.

    Thin lines are drawn above thick ones, each run's end point has its own colour and marker
    (none shared with the minimum's) and a legend entry.
    """
    import matplotlib  # in the test extra: this runs in CI

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        rosenbrock.draw(results, ax)
        lines = {line.get_label(): line for line in ax.get_lines()}
    finally:
        plt.close(fig)
    shown = [name for name in results if "in place" not in name]
    paths = {name: lines[f"{name}, lr {results[name][0]:g}"] for name in shown}
    ends = {
        name: lines[next(k for k in lines if k.startswith(f"{name.split()[0]} end "))]
        for name in shown
    }
    minimum = lines["minimum (1, 1)"]
    # Thinner lines lie on top of thicker ones.
    by_width = sorted(paths.values(), key=lambda line: line.get_linewidth())
    orders = [line.get_zorder() for line in by_width]
    assert orders == sorted(orders, reverse=True) and len(set(orders)) == len(orders)
    assert paths["GD"].get_zorder() > paths["Adam"].get_zorder()
    assert paths["GD"].get_linewidth() < paths["Adam"].get_linewidth()
    # Distinct colours and markers for the end points, above the paths and the minimum.
    styles = [(line.get_color(), line.get_marker()) for line in ends.values()]
    styles.append((minimum.get_color(), minimum.get_marker()))
    assert len({color for color, _ in styles}) == len(styles)
    assert len({marker for _, marker in styles}) == len(styles)
    for name, end in ends.items():
        px, py = end.get_data()
        last = results[name][2][-1]
        assert (float(px[0]), float(py[0])) == last
        assert end.get_zorder() > max(line.get_zorder() for line in paths.values())
        assert end.get_zorder() > minimum.get_zorder()
        assert paths[name].get_color() == end.get_color()


def test_readme_says_char_lm_trains_on_a_time_budget_and_how_to_reproduce_it() -> None:
    """Issue 8 item 16, the README half: char_lm's time budget and its ``--steps`` flag."""
    from diffprog.examples import char_lm

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    sentence = readme[readme.index("`char_lm` trains on a time budget") :].split("\n\n")[0]
    for flag in ("--seconds", "--steps", "--seed", "--threads"):
        assert f"`{flag}" in sentence, flag
        assert f'"{flag}"' in inspect.getsource(char_lm.main), flag  # the example's own flags
    assert "reproducible" in sentence
