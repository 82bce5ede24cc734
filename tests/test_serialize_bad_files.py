"""Bad model files: each gets a LoadError naming the file and the keys; nothing runs, nothing
half-loads. Fuzzed with random bytes and with mutations of valid files."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffprog as dp
import diffprog.nn as dnn

SPEC = dnn.SequentialSpec(dnn.LinearSpec(3, 4), dnn.BatchNorm1dSpec(4))
# Examples per fuzz test in the default run (four tests, 2,400 cases), and in the slow run.
FAST, SLOW = 800, 8000


def _model() -> Any:
    return dp.sample(SPEC, generator=torch.Generator().manual_seed(0))


def _skeleton() -> Any:
    return dp.sample(SPEC, device="meta")


def _raises(path: Path, *keys: str, **kwargs: Any) -> dp.LoadError:
    """Load ``path``: it must raise a LoadError naming the file and ``keys``."""
    with pytest.raises(dp.LoadError) as info:
        dp.load_params(_skeleton(), path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    for key in keys:
        assert repr(key) in message, (key, message)
    return info.value


def _safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ---------------------------------------------------------------- each kind of bad file


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_every_truncation_is_a_load_error(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    dp.save_params(_model(), good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    cuts = range(len(data)) if suffix == ".safetensors" else range(0, len(data), 7)
    for cut in cuts:
        bad.write_bytes(data[:cut])
        _raises(bad)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, world\n",
        b'{"weight": [1, 2, 3]}',
        b"\x89PNG\r\n\x1a\n" + bytes(64),
        b"PK\x03\x04" + bytes(64),
        b"\x80\x04K\x01.",  # a pickle of the number 1
    ],
    ids=["empty", "text", "json", "png", "zip", "pickle-int"],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin", ".weights"])
def test_wrong_format_is_a_load_error(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    path.write_bytes(content)
    _raises(path)


def test_a_file_of_another_model_names_the_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "lstm.safetensors"
    dp.save_params(dp.sample(dnn.LSTMSpec(3, 4)), path)
    e = _raises(path, "0.weight", "1.running_mean", "weight_ih_l0", "bias_hh_l0")
    assert e.missing_keys == list(dp.state_dict(_model()))
    assert e.unexpected_keys == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert e.source == str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_missing_unexpected_wrong_shape_and_dtype_in_a_file(tmp_path: Path, suffix: str) -> None:
    sd = {k: v.clone() for k, v in dp.state_dict(_model()).items()}
    del sd["1.bias"]
    sd["2.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(4, 4)
    sd["1.running_var"] = sd["1.running_var"].double()
    path = tmp_path / f"m{suffix}"
    dp.save_tensors(sd, path)
    e = _raises(path, "1.bias", "2.weight", "0.weight", "1.running_var")
    assert e.missing_keys == ["1.bias"] and e.unexpected_keys == ["2.weight"]
    assert e.mismatched_keys == ["0.weight", "1.running_var"]
    assert "float32[4, 4]" in str(e) and "float64[4]" in str(e)


def test_non_finite_values_are_refused_when_asked(tmp_path: Path) -> None:
    sd = {k: v.clone() for k, v in dp.state_dict(_model()).items()}
    sd["0.bias"] = torch.full((4,), float("nan"))
    sd["1.running_var"][2] = float("inf")
    path = tmp_path / "nan.safetensors"
    dp.save_tensors(sd, path)
    dp.load_params(_skeleton(), path)  # not asked: loads
    e = _raises(path, "0.bias", "1.running_var", check_finite=True)
    assert e.mismatched_keys == ["0.bias", "1.running_var"]


def test_tied_keys_with_different_values_in_a_file(tmp_path: Path) -> None:
    embed = dp.sample(dnn.EmbeddingSpec(5, 3))
    model = {"embed": embed, "head": dnn.Linear(embed.weight, None)}
    path = tmp_path / "tied.safetensors"
    dp.save_tensors({"embed.weight": torch.zeros(5, 3), "head.weight": torch.ones(5, 3)}, path)
    with pytest.raises(dp.LoadError, match=f"{path}.*'embed.weight' and 'head.weight'"):
        dp.load_params(model, path)


_EVIL_MARKER = "diffprog_pwned"


class _Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (exec, (f"with open({str(self.marker)!r}, 'w') as f: f.write('pwned')",))


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "raw-pickle", "in-a-dict"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / _EVIL_MARKER
    path = tmp_path / "evil.pt"
    evil = _Evil(marker)
    if kind == "torch-zip":
        torch.save(evil, path)
    elif kind == "torch-legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save({**dp.state_dict(_model()), "0.weight": evil}, path)
    e = _raises(path)
    assert "refused" in str(e)
    with pytest.raises(dp.LoadError):
        dp.load_tensors(path)
    assert not marker.exists()
    # The file really was dangerous: unpickling it unsafely writes the marker.
    if kind == "raw-pickle":
        pickle.loads(path.read_bytes())  # (unsafe on purpose)
        assert marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([torch.zeros(1)], "holds a list, not a state dict"),
        ({"0.weight": 1.0}, "'0.weight' holds a float"),
        ({1: torch.zeros(1)}, "the key 1 is not a string"),
        ({"0.weight": torch.zeros(4, 3).to_sparse()}, "sparse"),
    ],
)
def test_a_pt_file_that_is_not_a_state_dict(tmp_path: Path, content: Any, match: str) -> None:
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(dp.LoadError, match=match):
        dp.load_params(_skeleton(), path)


def _valid_entries() -> tuple[dict[str, Any], bytes]:
    sd = dp.state_dict(_model())
    header: dict[str, Any] = {}
    data = b""
    names = {torch.float32: "F32", torch.int64: "I64"}
    for key, t in sd.items():
        raw = t.contiguous().numpy().tobytes()
        header[key] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return header, data


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda h, d: (h, d + b"\0\0\0\0"), "4 bytes follow the last tensor"),
        (lambda h, d: ({**h, "0.bias": {**h["0.bias"], "dtype": "F33"}}, d), "unknown dtype"),
        (lambda h, d: ({**h, "0.bias": {**h["0.bias"], "shape": [-4]}}, d), "bad shape"),
        (lambda h, d: ({**h, "0.bias": {**h["0.bias"], "shape": [5]}}, d), "20 bytes"),
        (lambda h, d: ({**h, "0.bias": {**h["0.bias"], "shape": [True] * 4}}, d), "bad shape"),
        (
            lambda h, d: ({**h, "0.bias": {**h["0.bias"], "data_offsets": [0, 16]}}, d),
            "overlaps",
        ),
        (lambda h, d: ({**h, "0.bias": [1, 2]}, d), "not an object"),
        (lambda h, d: ({**h, "__metadata__": {"a": 1}}, d), "__metadata__"),
        (lambda h, d: ({**h, "__metadata__": {"diffprog.aliases": "{"}}, d), "aliases"),
        (
            lambda h, d: ({**h, "__metadata__": {"diffprog.aliases": '{"x": "nope"}'}}, d),
            "'x' names 'nope'",
        ),
    ],
)
def test_corrupt_safetensors_headers(tmp_path: Path, change: Any, match: str) -> None:
    header, data = change(*_valid_entries())
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    with pytest.raises(dp.LoadError, match=match):
        dp.load_params(_skeleton(), path)


def test_header_length_past_the_file_or_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    for n in (2**64 - 1, 200_000_000, 1000):
        path.write_bytes(struct.pack("<Q", n) + b"{}")
        _raises(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    _raises(path)
    nested = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(nested) + 1) + b"{" + nested)
    _raises(path)


def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    header = {"mask": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    path.write_bytes(_safetensors_bytes(header, b"\x00\x01\x02"))
    with pytest.raises(dp.LoadError, match="'mask' holds bytes other than 0 and 1"):
        dp.load_tensors(path)


def test_a_failed_load_leaves_no_half_loaded_model(tmp_path: Path) -> None:
    # The last tensor's bytes are cut off: the first ones were readable, but no model comes
    # back and the skeleton is as it was.
    model = _model()
    skeleton = dp.sample(SPEC, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in dp.state_dict(skeleton).items()}
    path = tmp_path / "m.safetensors"
    dp.save_params(model, path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(dp.LoadError, match="truncated"):
        dp.load_params(skeleton, path)
    for key, t in dp.state_dict(skeleton).items():
        assert torch.equal(t, before[key])


# ---------------------------------------------------------------- fuzzing


def _check_load(path: Path, mmap: bool = False) -> None:
    """Loading ``path`` gives a well-formed model or a LoadError naming the file: nothing
    else (no error from inside torch or the reader, no crash)."""
    try:
        loaded = dp.load_params(_skeleton(), path, mmap=mmap)
    except dp.LoadError as e:
        message = str(e)
    else:
        message = ""
    if message:
        assert str(path) in message
        return
    expected = dp.state_dict(_model())
    got = dp.state_dict(loaded)
    assert list(got) == list(expected)
    for key, t in got.items():
        assert (t.shape, t.dtype, t.device.type) == (
            expected[key].shape,
            expected[key].dtype,
            "cpu",
        )


def _prefixes() -> st.SearchStrategy[bytes]:
    """Starts that route the bytes into each reader: none, a zip, a pickle, a safetensors
    length with a JSON brace."""
    return st.sampled_from(
        [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", struct.pack("<Q", 40) + b"{"]
    )


def _fuzz_random_bytes(tmp_path: Path, examples: int) -> None:
    path = tmp_path / "fuzz.bin"

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(prefix=_prefixes(), body=st.binary(max_size=300))
    def check(prefix: bytes, body: bytes) -> None:
        path.write_bytes(prefix + body)
        _check_load(path)

    check()


def _mutations() -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """Edits of a file: (kind, position, byte); kind 0 sets a byte, 1 inserts, 2 deletes, 3
    truncates. Positions are taken modulo the length."""
    edit = st.tuples(st.integers(0, 3), st.integers(0, 2**31), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4)


def _mutate(data: bytes, edits: list[tuple[int, int, int]], header_bias: bool) -> bytes:
    out = bytearray(data)
    for kind, position, byte in edits:
        # Most edits land in the first 128 bytes (the length, the header, the archive's
        # directory entries are there), the rest anywhere.
        span = min(len(out), 128) if header_bias and position % 3 else len(out)
        at = position % max(span, 1)
        if kind == 0 and out:
            out[at] = byte
        elif kind == 1:
            out.insert(at, byte)
        elif kind == 2 and out:
            del out[at]
        elif kind == 3:
            del out[at:]
    return bytes(out)


def _fuzz_mutations(tmp_path: Path, suffix: str, examples: int) -> None:
    good = tmp_path / f"good{suffix}"
    dp.save_params(_model(), good)
    data = good.read_bytes()
    path = tmp_path / f"mutated{suffix}"

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(edits=_mutations(), header_bias=st.booleans(), mmap=st.booleans())
    def check(edits: list[tuple[int, int, int]], header_bias: bool, mmap: bool) -> None:
        path.write_bytes(_mutate(data, edits, header_bias))
        _check_load(path, mmap)

    check()


def test_fuzz_random_bytes(tmp_path: Path) -> None:
    _fuzz_random_bytes(tmp_path, FAST)


def test_fuzz_mutated_safetensors(tmp_path: Path) -> None:
    _fuzz_mutations(tmp_path, ".safetensors", FAST)


def test_fuzz_mutated_pt(tmp_path: Path) -> None:
    _fuzz_mutations(tmp_path, ".pt", FAST // 2)


def test_fuzz_mutated_pt_legacy_format(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(dp.state_dict(_model()), good, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    path = tmp_path / "mutated.pt"

    @settings(max_examples=FAST // 2, deadline=None, database=None)
    @given(edits=_mutations(), header_bias=st.booleans())
    def check(edits: list[tuple[int, int, int]], header_bias: bool) -> None:
        path.write_bytes(_mutate(data, edits, header_bias))
        _check_load(path)

    check()


@pytest.mark.slow
def test_fuzz_slow_many_more_cases(tmp_path: Path) -> None:
    _fuzz_random_bytes(tmp_path, SLOW)
    _fuzz_mutations(tmp_path, ".safetensors", SLOW)
    _fuzz_mutations(tmp_path, ".pt", SLOW)


def test_zip_with_a_data_pkl_that_runs_code(tmp_path: Path) -> None:
    # A hand-made archive in torch's layout whose data.pkl is a code-running pickle.
    marker = tmp_path / _EVIL_MARKER
    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
        z.writestr("archive/version", "3\n")
    path.write_bytes(buffer.getvalue())
    _raises(path)
    assert not marker.exists()
