"""Issue 10, "Training checkpoints" and the checkpoint cases of "Bad files".

A checkpoint holds the model (parameters and buffers), the optimizer's state (pure or
``TorchOptimizer``), the step, the random states and JSON metadata, in one safetensors file. The
tests resume in a fresh process (N steps, checkpoint, M more in a new interpreter) and compare
bit for bit with N + M uninterrupted steps, with Dropout, data shuffling and noise drawing from
torch's global generator, an explicit generator, Python's ``random`` and NumPy; kill a process
in the middle of writing a large checkpoint and find the previous one whole; rotate with
``keep_last``; find the newest with ``latest_checkpoint``; and refuse every bad file (truncated,
corrupt JSON part, corrupt data, another model, missing keys, fuzzed bytes) with a
``LoadError`` naming the file, leaving the skeletons and the random states untouched.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog.nn import BatchNorm1dSpec, DropoutSpec, LinearSpec, SequentialSpec
from diffprog.optim import GDM, Adam, TorchOptimizer, chain, clip_by_global_norm

SRC = str(Path(dp.__file__).resolve().parents[1])


def _model() -> Any:
    gen = torch.Generator().manual_seed(0)
    spec = SequentialSpec(
        LinearSpec(4, 8), BatchNorm1dSpec(8), torch.tanh, DropoutSpec(0.3), LinearSpec(8, 1)
    )
    return dp.sample(spec, generator=gen)


def _loss(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model: Any, opt: Any, steps: int) -> tuple[Any, Any]:
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss, model = dp.nn.training(_loss, model, x, x[:, :1] * 2)
        model, opt = dp.optim.run_step(model, opt, loss, 0.01)
    return model, opt


def _same_state(a: Any, b: Any) -> bool:
    sa, sb = dp.state_dict(a), dp.state_dict(b)
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pure", "chain", "torch", "chained-torch", "none"])
def test_a_checkpoint_round_trips_model_buffers_optimizer_step_and_metadata(
    kind: str, tmp_path: Path
) -> None:
    def build(model: Any) -> Any:
        if kind == "pure":
            return Adam.init(model, weight_decay=0.1)
        if kind == "chain":
            return chain(clip_by_global_norm(1.0), GDM.init(model, momentum=0.9))
        if kind == "torch":
            step_lr = lambda o: torch.optim.lr_scheduler.StepLR(o, 2)  # noqa: E731
            return TorchOptimizer.init(model, torch.optim.Adam, lr=0.01, scheduler=step_lr)
        if kind == "chained-torch":
            return chain(clip_by_global_norm(1.0), TorchOptimizer.init(model, torch.optim.SGD))
        return None

    model = _model()
    opt = build(model)
    if opt is not None:
        model, opt = _train(model, opt, 3)
    path = dp.save_checkpoint(
        tmp_path / "c.safetensors", model=model, optimizer=opt, step=3, epoch=1, cfg={"a": [1]}
    )
    skeleton = _model()
    got = dp.load_checkpoint(path, model=skeleton, optimizer=build(skeleton))
    assert got.step == 3 and got.extra == {"epoch": 1, "cfg": {"a": [1]}} and got.path == path
    assert _same_state(got.model, model)  # BatchNorm's running statistics included
    assert all(p.requires_grad and p.is_leaf for p in dp.flatten_parameters(got.model))
    if kind == "chained-torch":
        opt, got_opt = opt.inner, got.optimizer.inner
        assert got_opt.count == opt.count == 3
    if kind == "torch":
        assert got.optimizer.state_dict()["scheduler"] == opt.state_dict()["scheduler"]
        assert got.optimizer.optimizer.param_groups[0]["lr"] == 0.01 * 0.1  # stepped by StepLR
        want, have = opt.state_dict()["optimizer"], got.optimizer.state_dict()["optimizer"]
        for i, entry in want["state"].items():
            assert all(torch.equal(v, have["state"][i][k]) for k, v in entry.items())
    elif kind != "chained-torch" and opt is not None:
        a = dp.optimizer_state(opt, model)
        b = dp.optimizer_state(got.optimizer, got.model)
        assert a.meta == b.meta and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # and the file is plain safetensors: any tool reads it, no pickle anywhere
    assert "model.0.weight" in safetensors.torch.load_file(path)


def test_skeletons_on_meta_load_without_initialising(tmp_path: Path) -> None:
    model = _model()
    opt = Adam.init(model)
    model, opt = _train(model, opt, 2)
    path = dp.save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt, step=2)
    spec = SequentialSpec(
        LinearSpec(4, 8), BatchNorm1dSpec(8), torch.tanh, DropoutSpec(0.3), LinearSpec(8, 1)
    )
    skeleton = dp.sample(spec, device="meta")
    got = dp.load_checkpoint(path, model=skeleton, optimizer=Adam.init(skeleton))
    assert _same_state(got.model, model)
    assert all(not t.is_meta for t in got.optimizer.exp_avg + got.optimizer.exp_avg_sq)
    _, again = _train(got.model, got.optimizer, 1)  # and it trains on
    assert again.count == 3


def test_the_random_states_are_restored_only_after_every_check(tmp_path: Path) -> None:
    model = _model()
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    path = dp.save_checkpoint(
        tmp_path / "c.safetensors", model=model, optimizer=None, step=0, generators={"data": g}
    )
    want = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=g))
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    g.manual_seed(9)
    dp.load_checkpoint(path, model=_model(), optimizer=None, generators={"data": g})
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=g))
    assert torch.equal(got[0], want[0]) and got[1:3] == want[1:3] and torch.equal(got[3], want[3])
    # a saved generator not given is not restored, and says so
    with pytest.warns(dp.DiffprogWarning, match=r"generator\(s\) 'data', which are not restored"):
        dp.load_checkpoint(path, model=_model(), optimizer=None)
    # a generator the file lacks is refused, and nothing is restored
    torch.manual_seed(9)
    with pytest.raises(dp.LoadError, match=r"holds no generator 'other'"):
        dp.load_checkpoint(path, model=_model(), optimizer=None, generators={"other": g})
    assert torch.equal(torch.rand(3), (torch.manual_seed(9), torch.rand(3))[1])


# --- resuming in a fresh process -------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import random, sys
    import numpy as np
    import torch
    import diffprog as dp
    from diffprog.nn import BatchNorm1dSpec, DropoutSpec, LinearSpec, SequentialSpec, training
    from diffprog.optim import Adam, TorchOptimizer, run_step

    mode, folder, kind = sys.argv[1:4]
    n, m = int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)

    def fresh():
        spec = SequentialSpec(LinearSpec(4, 16), BatchNorm1dSpec(16), torch.tanh,
                              DropoutSpec(0.5), LinearSpec(16, 1))
        model = dp.sample(spec, generator=torch.Generator().manual_seed(0))
        if kind == "torch":
            return model, TorchOptimizer.init(model, torch.optim.Adam, lr=0.01)
        return model, Adam.init(model, weight_decay=0.01)

    def loss_fn(model, x, y):
        return torch.nn.functional.mse_loss(model(x), y)

    data = torch.Generator().manual_seed(1)
    pool = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))

    def steps(model, opt, count):
        for _ in range(count):
            idx = random.sample(range(64), 16)  # Python's random
            x = pool[idx] + torch.randn(16, 4, generator=data) * 0.1  # an explicit generator
            y = x[:, :1] * x[:, 1:2] + torch.from_numpy(np.random.randn(16, 1)).float()  # NumPy
            loss, model = training(loss_fn, model, x, y)  # Dropout: torch's global generator
            model, opt = run_step(model, opt, loss, 0.01)
        return model, opt

    model, opt = fresh()
    if mode == "resume":
        ck = dp.load_checkpoint(folder + "/ck.safetensors", model=model, optimizer=opt,
                                generators={"data": data})
        model, opt = steps(ck.model, ck.optimizer, m)
    else:
        torch.manual_seed(3); random.seed(4); np.random.seed(5)
        model, opt = steps(model, opt, n if mode == "first" else n + m)
        if mode == "first":
            dp.save_checkpoint(folder + "/ck.safetensors", model=model, optimizer=opt, step=n,
                               generators={"data": data})
    if mode != "first":
        dp.save_params(model, folder + "/" + mode + ".safetensors")
    """
)


def _child(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stderr=subprocess.PIPE)


def _run(tmp_path: Path, *args: str) -> None:
    with _child(tmp_path, *args) as proc:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()


@pytest.mark.parametrize("kind", ["pure", "torch"])
def test_resuming_in_a_fresh_process_gives_the_uninterrupted_run_bit_for_bit(
    kind: str, tmp_path: Path
) -> None:
    folder = str(tmp_path)
    _run(tmp_path, "full", folder, kind, "5", "4")
    _run(tmp_path, "first", folder, kind, "5", "4")
    _run(tmp_path, "resume", folder, kind, "5", "4")
    full = safetensors.torch.load_file(tmp_path / "full.safetensors")
    resumed = safetensors.torch.load_file(tmp_path / "resume.safetensors")
    assert list(full) == list(resumed)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


# --- crash safety, rotation, finding the newest ---------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    import torch
    import diffprog as dp
    model = {"big": dp.make_independent(torch.full((int(sys.argv[2]),), 2.0))}
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    dp.save_checkpoint(sys.argv[1], model=model, optimizer=None, step=2)
    """
)


def _partial_temp_file(folder: Path) -> Path | None:
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.stat().st_size > 0:
            return p
    return None


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ck.safetensors"
    numel = 50_000_000  # 200 MB: the write takes long enough to be caught in the middle
    before = {"big": dp.make_independent(torch.ones(numel))}
    dp.save_checkpoint(path, model=before, optimizer=None, step=1)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": SRC}
    command = [sys.executable, str(script), str(path), str(numel)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 60
        caught = None
        while caught is None and proc.poll() is None and time.monotonic() < deadline:
            caught = _partial_temp_file(tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert caught is not None, "the writer finished before it could be killed mid-write"
    assert caught.stat().st_size < path.stat().st_size  # it really was cut short
    assert dp.latest_checkpoint(tmp_path) == path
    got = dp.load_checkpoint(path, model=before, optimizer=None)
    assert got.step == 1 and torch.equal(got.model["big"], before["big"])


def test_keep_last_rotates_and_latest_checkpoint_finds_the_newest_complete_one(
    tmp_path: Path,
) -> None:
    model = _model()
    for step in range(5):
        dp.save_checkpoint(
            tmp_path / f"step-{step}.safetensors",
            model=model,
            optimizer=None,
            step=step,
            keep_last=2,
        )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-3.safetensors", "step-4.safetensors"]
    assert dp.latest_checkpoint(tmp_path) == tmp_path / "step-4.safetensors"
    # a truncated newer file, a model file and a stray file do not count
    data = (tmp_path / "step-4.safetensors").read_bytes()
    (tmp_path / "step-9.safetensors").write_bytes(data[: len(data) // 2])
    dp.save_params(model, tmp_path / "weights.safetensors")
    (tmp_path / "notes.safetensors").write_text("hello")
    assert dp.latest_checkpoint(tmp_path) == tmp_path / "step-4.safetensors"
    assert dp.latest_checkpoint(tmp_path / "missing") is None
    # rotation deletes diffprog checkpoints only, and never the one just written
    dp.save_checkpoint(
        tmp_path / "old.safetensors", model=model, optimizer=None, step=0, keep_last=1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.safetensors",
        "old.safetensors",
        "step-9.safetensors",
        "weights.safetensors",
    ]


# --- bad files -----------------------------------------------------------------------------


def _saved(tmp_path: Path) -> tuple[Path, Any, Any]:
    model = _model()
    opt = Adam.init(model)
    model, opt = _train(model, opt, 1)
    path = dp.save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt, step=1)
    return path, model, opt


def _rewrite_json(path: Path, edit: Any, *, fix_crc: bool = True) -> None:
    """Rewrite the checkpoint's JSON part with ``edit(document)`` (the tensors kept)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = f.read()
    metadata = header["__metadata__"]
    text = edit(metadata["diffprog.checkpoint"])
    metadata["diffprog.checkpoint"] = text
    if fix_crc:  # as a buggy writer would: the JSON part's CRC-32 matches, the content is bad
        metadata["diffprog.checkpoint.crc32"] = str(zlib.crc32(text.encode()))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _expect_refused(path: Path, match: str, **kwargs: Any) -> dp.LoadError:
    skeleton = _model()
    optimizer = kwargs.pop("optimizer", Adam.init(skeleton))
    state = torch.get_rng_state()
    with pytest.raises(dp.LoadError, match=match) as info:
        dp.load_checkpoint(path, model=kwargs.pop("model", skeleton), optimizer=optimizer)
    assert info.value.source == str(path) and str(path) in str(info.value)
    assert torch.equal(torch.get_rng_state(), state)  # nothing restored
    return info.value


def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        _expect_refused(path, "not a valid safetensors file")


def test_a_corrupt_json_part_is_refused_naming_the_file(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    _rewrite_json(path, lambda text: text.replace('"step":1', '"step":7'), fix_crc=False)
    _expect_refused(path, r"JSON part is corrupt \(its CRC-32")
    path, _, _ = _saved(tmp_path)
    _rewrite_json(path, lambda text: text[:-5])
    _expect_refused(path, "JSON part is corrupt")
    path, _, _ = _saved(tmp_path)
    _rewrite_json(path, lambda text: text.replace('"step":1', '"step":"one"'))
    _expect_refused(path, "step is not a count")
    path, _, _ = _saved(tmp_path)
    _rewrite_json(path, lambda text: text.replace('"count":1', '"count":-1'))
    _expect_refused(path, "step count")


def test_corrupt_tensor_data_is_refused_naming_the_key(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a bit flip in the last tensor's bytes
    path.write_bytes(bytes(data))
    error = _expect_refused(path, "is corrupt")
    assert len(error.mismatched_keys) == 1


def test_a_checkpoint_of_another_model_or_optimizer_is_refused_naming_the_keys(
    tmp_path: Path,
) -> None:
    path, _, _ = _saved(tmp_path)
    other = dp.sample(SequentialSpec(LinearSpec(4, 8), LinearSpec(8, 2)))
    error = _expect_refused(path, "does not fit the skeleton", model=other, optimizer=None)
    assert "model.1.running_mean" not in error.unexpected_keys  # keys named as the model's
    assert "1.running_mean" in error.unexpected_keys
    _expect_refused(
        path, "weight_decay=0.0 saved, 0.5 here", optimizer=Adam.init(_model(), weight_decay=0.5)
    )
    _expect_refused(
        path, "not a TorchOptimizer.s", optimizer=TorchOptimizer.init(_model(), torch.optim.Adam)
    )
    _expect_refused(path, "pass its skeleton", optimizer=None)


def test_a_checkpoint_missing_keys_is_refused_naming_them(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    tensors = safetensors.torch.load_file(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        metadata = json.loads(f.read(n))["__metadata__"]
    del tensors["model.0.bias"]
    del tensors["optimizer.exp_avg.4.weight"]
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    error = _expect_refused(path, "'model.0.bias'")
    assert set(error.missing_keys) == {"model.0.bias", "optimizer.exp_avg.4.weight"}


def test_what_cannot_be_saved_is_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    model = _model()
    with pytest.raises(dp.SaveError, match="not JSON-able"):
        dp.save_checkpoint(path, model=model, optimizer=None, step=0, when=object())
    with pytest.raises(dp.SaveError, match="step must be"):
        dp.save_checkpoint(path, model=model, optimizer=None, step=-1)
    with pytest.raises(dp.SaveError, match="keep_last must be"):
        dp.save_checkpoint(path, model=model, optimizer=None, step=0, keep_last=0)
    with pytest.raises(dp.SaveError, match="not a torch.Generator"):
        dp.save_checkpoint(path, model=model, optimizer=None, step=0, generators={"g": 1})
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_model_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    dp.save_params(_model(), path)
    _expect_refused(path, "not a diffprog checkpoint")
    _expect_refused(tmp_path / "nothing.safetensors", "no such checkpoint")


# Examples per fuzz test in the default run (two tests: 2,000 cases), and in the slow run.
FAST, SLOW = 1000, 10000
FUZZ_SPEC = SequentialSpec(LinearSpec(2, 3), BatchNorm1dSpec(3))


def _valid_checkpoint(folder: Path) -> tuple[bytes, Any]:
    model = dp.sample(FUZZ_SPEC)
    opt = Adam.init(model)
    path = dp.save_checkpoint(folder / "c.safetensors", model=model, optimizer=opt, step=1, a=1)
    return path.read_bytes(), model


def _fuzz_random_bytes(folder: Path, examples: int) -> None:
    path = folder / "fuzz.safetensors"
    model = dp.sample(FUZZ_SPEC, device="meta")

    @settings(max_examples=examples, deadline=None)
    @given(data=st.binary(max_size=2048))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        with pytest.raises(dp.LoadError) as info:
            dp.load_checkpoint(path, model=model, optimizer=None, restore_rng=False)
        assert str(path) in str(info.value)

    check()


def _fuzz_mutations(folder: Path, examples: int) -> None:
    valid, saved_model = _valid_checkpoint(folder)
    path = folder / "m.safetensors"

    @settings(max_examples=examples, deadline=None)
    @given(
        edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=4),
        cut=st.none() | st.integers(0, 10**9),
    )
    def check(edits: list[tuple[int, int]], cut: int | None) -> None:
        data = bytearray(valid)
        for at, byte in edits:
            data[at % len(data)] = byte
        if cut is not None:
            data = data[: cut % len(data)]
        path.write_bytes(bytes(data))
        model = dp.sample(FUZZ_SPEC)
        error: dp.LoadError | None = None
        try:
            got = dp.load_checkpoint(
                path, model=model, optimizer=Adam.init(model), restore_rng=False
            )
        except dp.LoadError as e:
            error = e
        if error is not None:
            assert str(path) in str(error)
        else:
            # Only a mutation the format cannot tell from a real file loads (the same byte
            # written back, a space of the header's padding, a digit of the metadata): then
            # every tensor is the saved one, as the CRCs guarantee.
            assert _same_state(got.model, saved_model)
            assert got.step == 1 and got.extra == {"a": 1}

    check()


def test_fuzzed_bytes_never_load_and_always_give_a_load_error(tmp_path: Path) -> None:
    _fuzz_random_bytes(tmp_path, FAST)


def test_mutations_of_a_valid_checkpoint_never_half_load(tmp_path: Path) -> None:
    _fuzz_mutations(tmp_path, FAST)


@pytest.mark.slow
def test_fuzz_checkpoints_slow_many_more_cases(tmp_path: Path) -> None:
    _fuzz_random_bytes(tmp_path, SLOW)
    _fuzz_mutations(tmp_path, SLOW)


@pytest.mark.cuda
def test_cuda_random_states_and_state_on_the_gpu_round_trip(tmp_path: Path) -> None:
    model = dp.sample(SPEC_CUDA, device="cuda")
    opt = Adam.init(model)
    model, opt = dp.optim.run_step(model, opt, model(torch.ones(2, 4, device="cuda")).sum(), 0.1)
    torch.cuda.manual_seed_all(7)
    path = dp.save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt, step=1)
    want = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(9)
    got = dp.load_checkpoint(path, model=dp.sample(SPEC_CUDA, device="cuda"), optimizer=opt)
    assert torch.equal(torch.rand(3, device="cuda"), want)  # CUDA's generator restored
    assert all(t.is_cuda for t in got.optimizer.exp_avg)
    assert _same_state(got.model, model)


SPEC_CUDA = LinearSpec(4, 2)
