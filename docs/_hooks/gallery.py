"""MkDocs hook: the examples gallery, generated at build time by running every example.

``on_files`` runs each program of ``diffprog.examples`` in a subprocess
(``python -m diffprog.examples.NAME ...``) with a reduced budget, captures what it prints and
the plot it saves, and adds the page ``gallery.md`` and its images to the build. Nothing of it
is committed: the page always shows what the code of the checkout does. ``generate`` does the
work without MkDocs (the test suite calls it into a temporary folder).

The examples run with the interpreter that runs MkDocs, or the one named by the environment
variable ``DIFFPROG_GALLERY_PYTHON`` (when the docs tools live in an environment without
torch), with this checkout's ``src`` in front of ``PYTHONPATH``.

A new example must get an entry in ``EXAMPLES`` (its reduced arguments and its plot): the
build fails, naming it, until it has one, and it fails too when an example exits with an error
or does not write the plot its entry promises.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "diffprog.examples"
PAGE = "gallery.md"
IMAGES = "gallery"  # the plots go to gallery/NAME.png, beside the page
TIMEOUT = 300.0  # seconds for one example: far above the reduced budgets


class GalleryError(RuntimeError):
    """The gallery cannot be built: an example failed, lacks an entry, or wrote no plot."""


@dataclasses.dataclass(frozen=True)
class Example:
    """How the gallery runs one example.

    Args:
        name: the module in ``diffprog.examples``.
        args: the reduced-budget arguments this page runs it with.
        full: the arguments of a full run (``()``: the defaults).
        plot: the PNG file the reduced run writes (``None``: the example makes no plot).
        group: examples of one group run one after the other, in order (``predict`` reads
            the model file that ``digits --save`` wrote); groups run in parallel.
        reduced: whether ``args`` is a smaller budget than a full run's (the page says so).
    """

    name: str
    args: tuple[str, ...]
    full: tuple[str, ...] = ()
    plot: str | None = None
    group: str = ""
    reduced: bool = False


# In the order of the page: from Hasktorch's first programs to the transformations.
EXAMPLES: tuple[Example, ...] = (
    Example("regression", ()),
    Example("xor_mlp", ()),
    Example("rosenbrock", ("rosenbrock.png",), plot="rosenbrock.png"),
    Example(
        "digits",
        (
            "--epochs",
            "10",
            "--no-progress",
            "--plot",
            "digits.png",
            "--save",
            "digits.safetensors",
        ),
        full=("--save", "digits.safetensors"),
        plot="digits.png",
        group="digits",
        reduced=True,
    ),
    Example("predict", ("digits.safetensors",), full=("digits.safetensors",), group="digits"),
    # One rank here (a group of one); torchrun --nproc-per-node 2 runs two (docs/distributed.md).
    Example("digits_ddp", ()),
    Example("ensemble", ("ensemble.png",), plot="ensemble.png"),
    Example("maml", ("--iterations", "200", "--plot", "maml.png"), plot="maml.png", reduced=True),
    Example("char_lm", ("--steps", "150", "--length", "200", "--no-progress"), reduced=True),
)


@dataclasses.dataclass(frozen=True)
class Run:
    """What one example printed, how long it took, and where its plot is (if any)."""

    example: Example
    output: str
    seconds: float
    plot: pathlib.Path | None


def example_modules(source: pathlib.Path) -> list[str]:
    """The example programs in the folder ``source``: every module but ``__init__``."""
    return sorted(p.stem for p in source.glob("*.py") if not p.stem.startswith("_"))


def describe(module: pathlib.Path) -> tuple[str, str]:
    """The title (first line) and the rest of a module's docstring, as Markdown."""
    doc = ast.get_docstring(ast.parse(module.read_text(encoding="utf-8"))) or module.stem
    doc = doc.replace("``", "`")
    title, _, rest = doc.partition("\n")
    return title.strip().rstrip("."), rest.strip()


def command(package: str, example: Example, args: Sequence[str]) -> str:
    """The shell command that runs ``example`` with ``args``."""
    return shlex.join(["python", "-m", f"{package}.{example.name}", *args])


def _environment(paths: Sequence[pathlib.Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*(str(p) for p in paths), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["MPLBACKEND"] = "Agg"
    env["OMP_NUM_THREADS"] = "1"  # the examples run on one thread each, two at a time
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_one(
    example: Example,
    *,
    package: str,
    workdir: pathlib.Path,
    env: dict[str, str],
    python: str,
) -> Run:
    argv = [python, "-m", f"{package}.{example.name}", *example.args]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise GalleryError(
            f"example {example.name!r} ran over {TIMEOUT:.0f} s: "
            f"{command(package, example, example.args)}; reduce its budget in EXAMPLES "
            f"({__file__})."
        ) from e
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise GalleryError(
            f"example {example.name!r} failed (exit status {done.returncode}): "
            f"{command(package, example, example.args)}\n{done.stderr[-4000:]}"
        )
    plot = None
    if example.plot is not None:
        plot = workdir / example.plot
        if not plot.is_file():
            raise GalleryError(
                f"example {example.name!r} wrote no plot {example.plot!r}: "
                f"{command(package, example, example.args)}; is matplotlib installed (the "
                "'examples' extra), and does the entry in EXAMPLES name the file it writes?"
            )
    output = done.stdout
    for folder in {str(workdir.resolve()), str(workdir)}:  # "saved to /tmp/...": relative
        output = output.replace(folder + os.sep, "")
    return Run(example, output.rstrip(), seconds, plot)


def run_examples(
    examples: Sequence[Example],
    workdir: pathlib.Path,
    *,
    package: str = PACKAGE,
    paths: Sequence[pathlib.Path] = (SRC,),
    python: str = sys.executable,
    jobs: int = 2,
) -> list[Run]:
    """Run ``examples`` in ``workdir``, ``jobs`` groups at a time; in the order given.

    Raises:
        GalleryError: an example failed, ran over the time limit or wrote no plot.
    """
    env = _environment(paths)
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.group or example.name, []).append(example)

    def run_group(members: list[Example]) -> list[Run]:
        return [
            _run_one(e, package=package, workdir=workdir, env=env, python=python) for e in members
        ]

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # the longest groups first would balance better; the page's order is kept below
        futures = [pool.submit(run_group, members) for members in groups.values()]
        runs = {run.example.name: run for f in futures for run in f.result()}
    return [runs[e.name] for e in examples]


def torch_version(python: str, paths: Sequence[pathlib.Path]) -> str:
    """The version of torch that ``python`` imports (the docs tools may have none).

    Raises:
        GalleryError: ``python`` cannot import torch.
    """
    done = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"],
        env=_environment(paths),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise GalleryError(
            f"{python} cannot import torch, so it cannot run the examples: run MkDocs from an "
            "environment with diffprog's dependencies, or name such an interpreter in "
            f"DIFFPROG_GALLERY_PYTHON.\n{done.stderr[-2000:]}"
        )
    return done.stdout.strip()


def render(
    runs: Sequence[Run],
    *,
    package: str,
    source: pathlib.Path,
    seconds: float,
    jobs: int,
    torch: str,
) -> str:
    """The Markdown of the gallery page."""
    lines = [
        "# Examples gallery",
        "",
        f"Every program in `{package}`, run when this site was built: what it shows, the "
        "command, what it printed and the plot it saved. Nothing here is written by hand, so "
        "the page always shows what the code does.",
        "",
    ]
    reduced = [f"`{run.example.name}`" for run in runs if run.example.reduced]
    if reduced:
        lines += [
            '!!! note "Reduced budgets"',
            f"    To keep the build short, the longer examples ({', '.join(reduced)}) ran "
            "here with a **reduced budget** (fewer epochs, steps or iterations than their "
            "defaults), so their numbers are not as good as a full run's. The full command is "
            "given with each example; run it from any folder (the examples need the "
            '`examples` extra: `pip install "diffprog[examples]"`).',
            "",
        ]
    lines += [
        f"Built with torch {torch} on the CPU, one thread per example, {jobs} "
        f"at a time: {seconds:.0f} s for the whole gallery.",
        "",
    ]
    for run in runs:
        example = run.example
        lines.append(f"- [`{example.name}`](#{example.name})")
    lines.append("")
    for run in runs:
        example = run.example
        title, body = describe(source / f"{example.name}.py")
        lines += [f"## {example.name}", "", f"**{title}.**", "", body, ""]
        lines += [
            "Full run:",
            "",
            "```console",
            command(package, example, example.full),
            "```",
            "",
            f"This page's run ({'reduced' if example.reduced else 'full'} budget, "
            f"{run.seconds:.1f} s):",
            "",
            "```console",
            command(package, example, example.args),
            "```",
            "",
            "```text",
            run.output or "(no output)",
            "```",
            "",
        ]
        if run.plot is not None:
            lines += [f"![The plot {example.name} saved]({IMAGES}/{example.name}.png)", ""]
    return "\n".join(lines)


def generate(
    out_dir: pathlib.Path,
    *,
    examples: Sequence[Example] = EXAMPLES,
    package: str = PACKAGE,
    source: pathlib.Path = SRC / "diffprog" / "examples",
    paths: Sequence[pathlib.Path] = (SRC,),
    python: str = sys.executable,
    jobs: int = 2,
) -> pathlib.Path:
    """Run the examples and write ``out_dir/gallery.md`` and ``out_dir/gallery/NAME.png``.

    Args:
        out_dir: the folder to write into (created if missing).
        examples: how to run each example; every module in ``source`` needs one.
        package: the package whose modules are run (``python -m package.NAME``).
        source: the folder of the package's modules (the docstrings describe them).
        paths: folders put in front of the subprocesses' ``PYTHONPATH``.
        python: the interpreter to run them with.
        jobs: how many examples run at a time.

    Returns:
        The path of the page.

    Raises:
        GalleryError: an example has no entry in ``examples`` (or an entry names no example),
            an example failed, ran over the time limit or wrote no plot.

    Example:
        >>> page = generate(pathlib.Path("site-gallery"))  # doctest: +SKIP
    """
    modules = example_modules(source)
    named = [e.name for e in examples]
    missing = [m for m in modules if m not in named]
    if missing:
        raise GalleryError(
            f"the examples {missing} have no entry in the gallery: add an Example(...) for each "
            f"to EXAMPLES in {__file__} (its reduced-budget arguments and the plot it writes)."
        )
    unknown = [n for n in named if n not in modules]
    if unknown:
        raise GalleryError(
            f"EXAMPLES in {__file__} names {unknown}, which are not modules of {package} "
            f"({source}): remove or rename those entries."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    version = torch_version(python, paths)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffprog-gallery-") as tmp:
        workdir = pathlib.Path(tmp)
        runs = run_examples(
            examples, workdir, package=package, paths=paths, python=python, jobs=jobs
        )
        images = out_dir / IMAGES
        images.mkdir(exist_ok=True)
        for run in runs:
            if run.plot is not None:
                (images / f"{run.example.name}.png").write_bytes(run.plot.read_bytes())
    page = out_dir / PAGE
    page.write_text(
        render(
            runs,
            package=package,
            source=source,
            seconds=time.perf_counter() - start,
            jobs=jobs,
            torch=version,
        )
        + "\n",
        encoding="utf-8",
    )
    return page


# --- MkDocs -------------------------------------------------------------------------------

_BUILT: dict[str, pathlib.Path] = {}  # source digest -> folder: `mkdocs serve` rebuilds once


def _digest(source: pathlib.Path) -> str:
    h = hashlib.sha256(repr(EXAMPLES).encode())
    h.update(os.environ.get("DIFFPROG_GALLERY_PYTHON", "").encode())
    for path in sorted(source.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(source)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Run the examples and add ``gallery.md`` and its plots to the site's files.

    Raises:
        GalleryError: as :func:`generate`, or ``docs/`` already holds a ``gallery.md``.
    """
    from mkdocs.structure.files import File

    if files.get_file_from_path(PAGE) is not None:
        raise GalleryError(
            f"{PAGE} is generated by {__file__}: remove the {PAGE} in {config['docs_dir']}."
        )
    source = SRC / "diffprog" / "examples"
    key = _digest(source)
    if key not in _BUILT:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="diffprog-gallery-page-"))
        generate(folder, python=os.environ.get("DIFFPROG_GALLERY_PYTHON") or sys.executable)
        _BUILT.clear()
        _BUILT[key] = folder
    folder = _BUILT[key]
    for path in [folder / PAGE, *sorted((folder / IMAGES).glob("*.png"))]:
        files.append(
            File(
                path.relative_to(folder).as_posix(),
                src_dir=str(folder),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
