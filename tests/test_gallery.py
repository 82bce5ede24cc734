"""The examples gallery's generator (docs/_hooks/gallery.py): every example, its output, plots."""

from __future__ import annotations

import importlib.util
import pathlib
import pkgutil
import re
import sys
import tempfile
import types

import pytest

import diffprog.examples

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLOTTING = {"digits", "ensemble", "maml", "rosenbrock"}  # the examples that save a plot
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gallery() -> types.ModuleType:
    """The hook module, loaded from its file as MkDocs loads it."""
    spec = importlib.util.spec_from_file_location("gallery_hook", ROOT / "docs/_hooks/gallery.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gallery_runs_every_example_and_shows_its_output_and_plot(
    gallery: types.ModuleType, tmp_path: pathlib.Path
) -> None:
    page = gallery.generate(tmp_path / "site")
    text = page.read_text()
    names = sorted(m.name for m in pkgutil.iter_modules(diffprog.examples.__path__))
    assert names, "no examples found"
    sections = dict(
        zip(
            re.findall(r"^## (\w+)$", text, re.MULTILINE),
            re.split(r"^## \w+$", text, flags=re.MULTILINE)[1:],
            strict=True,
        )
    )
    assert sorted(sections) == names
    for name, section in sections.items():
        assert f"python -m diffprog.examples.{name}" in section, name
        output = re.search(r"```text\n(.*?)\n```", section, re.DOTALL)
        assert output is not None and output.group(1).strip(), f"{name}: no output"
        assert "(no output)" not in output.group(1), name
        assert re.search(r"\((full|reduced) budget, [\d.]+ s\)", section), name
        image = f"![The plot {name} saved](gallery/{name}.png)"
        assert (image in section) == (name in PLOTTING), name
    for name in PLOTTING:
        assert (tmp_path / "site/gallery" / f"{name}.png").read_bytes()[:8] == PNG, name
    assert sorted(p.stem for p in (tmp_path / "site/gallery").iterdir()) == sorted(PLOTTING)
    # what the examples print, as they print it
    assert "Learned bias:" in sections["regression"]
    assert "1, 1 =>" in sections["xor_mlp"]
    assert "sample:" in sections["char_lm"]
    trained = re.search(r"test accuracy: ([\d.]+%)", sections["digits"])
    reloaded = re.search(r"test accuracy: ([\d.]+%) on 360", sections["predict"])
    assert trained is not None and reloaded is not None
    assert trained.group(1) == reloaded.group(1)  # predict read the model digits saved
    assert tempfile.gettempdir() not in text  # the files the examples wrote, shown relative
    assert "Reduced budgets" in text and "`digits`, `maml`, `char_lm`" in text


def test_an_example_without_an_entry_is_refused_by_name(gallery: types.ModuleType) -> None:
    entries = tuple(e for e in gallery.EXAMPLES if e.name != "maml")
    with pytest.raises(gallery.GalleryError, match=r"\['maml'\] have no entry"):
        gallery.generate(pathlib.Path("unused"), examples=entries)
    extra = (*gallery.EXAMPLES, gallery.Example("nonesuch", ()))
    with pytest.raises(gallery.GalleryError, match=r"names \['nonesuch'\]"):
        gallery.generate(pathlib.Path("unused"), examples=extra)


def _package(root: pathlib.Path, modules: dict[str, str]) -> pathlib.Path:
    folder = root / "fake_examples"
    folder.mkdir()
    (folder / "__init__.py").write_text('"""Fake examples."""\n')
    for name, code in modules.items():
        (folder / f"{name}.py").write_text(f'"""The {name} example.\n\nIt is fake."""\n{code}')
    return folder


def test_a_failing_example_or_a_missing_plot_fails_the_build(
    gallery: types.ModuleType, tmp_path: pathlib.Path
) -> None:
    source = _package(tmp_path, {"boom": "raise SystemExit('it broke')\n"})
    with pytest.raises(
        gallery.GalleryError, match=r"'boom' failed \(exit status 1\)(.|\n)*it broke"
    ):
        gallery.generate(
            tmp_path / "out",
            examples=(gallery.Example("boom", ()),),
            package="fake_examples",
            source=source,
            paths=(tmp_path, ROOT / "src"),
        )
    (source / "boom.py").unlink()
    (source / "quiet.py").write_text('"""Quiet."""\nprint("no plot written")\n')
    with pytest.raises(gallery.GalleryError, match=r"'quiet' wrote no plot 'quiet.png'"):
        gallery.generate(
            tmp_path / "out",
            examples=(gallery.Example("quiet", (), plot="quiet.png"),),
            package="fake_examples",
            source=source,
            paths=(tmp_path, ROOT / "src"),
        )
    page = gallery.generate(
        tmp_path / "out",
        examples=(gallery.Example("quiet", ()),),
        package="fake_examples",
        source=source,
        paths=(tmp_path, ROOT / "src"),
    )
    assert "## quiet\n\n**Quiet.**" in page.read_text()
    assert "no plot written" in page.read_text()
