"""Seeded fuzzing of the headers loaders trust: safetensors headers, config.json, GGUF metadata and tensor infos.

Every mutated checkpoint is loaded by a worker process that runs under an address-space limit
(RLIMIT_AS: the memory it had after loading the original, plus `MEMORY_BUDGET`) and answers
within `TIME_BUDGET` seconds, or the test fails naming the case. A load must either succeed
with the original's logits or fail with one of the errors the CLI reports as one line, its
message naming the checkpoint. The exceptions: GGUF tensor types, data offsets, value types and
the sliding window, which a valid file of another model may hold too (GGUF has no checksums), so there a
load may also succeed with other logits; it must still be bounded and clear.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from gemma_jax.checkpoint.compressed_tensors import save_compressed_tensors
from gemma_jax.checkpoint.gguf import write_gguf
from gemma_jax.checkpoint.hf import hf_source
from gemma_jax.checkpoint.manifest import MANIFEST_FILE
from gemma_jax.convert import convert

TIME_BUDGET = 30.0  # seconds per load; generous for a shared 2-core machine, a hang never ends
MEMORY_BUDGET = 2 << 30  # bytes of address space a load may add to the worker's
TOKENS = [2, 5, 9, 13, 7, 11]
CLEAR = ("ValueError", "FileNotFoundError", "NotImplementedError")  # what `gemma-jax` reports as `error: ...`

# The worker: reads checkpoint paths (JSON lines), answers logits or the error (JSON lines).
# "limit" caps its address space once the first load has compiled and warmed everything up.
_WORKER = r"""
import functools, json, resource, sys, traceback
import jax, jax.numpy as jnp, numpy as np
from gemma_jax.checkpoint.resolve import open_checkpoint
from gemma_jax.models.gemma.model import Transformer

@functools.cache
def forward(config):
    return jax.jit(lambda params, tokens: Transformer(config).apply(
        {"params": params}, tokens, jnp.arange(tokens.shape[1])[None], jnp.ones_like(tokens))[0])

for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "limit":
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + request["budget"], resource.RLIM_INFINITY))
        answer = {"ok": True}
    else:
        try:
            config, params, _ = open_checkpoint(request["path"], dtype=np.float32)
            answer = {"logits": np.asarray(forward(config)(params, np.asarray([request["tokens"]]))).tolist()}
        except BaseException as e:
            chain, cause = [], e
            while cause is not None:
                chain, cause = chain + [type(cause).__name__], cause.__cause__ or cause.__context__
            answer = {"error": type(e).__name__, "chain": chain, "message": str(e), "trace": traceback.format_exc()}
    print(json.dumps(answer), flush=True)
"""


class BoundedLoader:
    """A worker process loading checkpoints one at a time under a time and a memory bound."""

    def __init__(self, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True, env=env)  # fmt: skip
        self.limited = False

    def _ask(self, request: dict[str, Any], what: str, timeout: float) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            state = "no answer within {:.0f} s".format(timeout) if not ready else "the worker died"
            pytest.fail(f"{what}: {state}; worker log:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def load(self, path: Path, what: str) -> dict[str, Any]:
        # The first load also imports and compiles: it gets more time, and only then is memory capped.
        answer = self._ask({"op": "load", "path": str(path), "tokens": TOKENS}, what, TIME_BUDGET * (1 if self.limited else 10))
        if not self.limited:
            self._ask({"op": "limit", "budget": MEMORY_BUDGET}, "setting the memory limit", TIME_BUDGET)
            self.limited = True
        return answer

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    loader = BoundedLoader(tmp_path_factory.mktemp("worker") / "stderr.log")
    yield loader
    loader.close()


@pytest.fixture(scope="module")
def bases(text_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The original checkpoints: HF (the shared tiny Gemma 2 with its tokenizer), GGUF, our Orbax."""
    root = tmp_path_factory.mktemp("bases")
    hf = root / "hf"
    shutil.copytree(text_checkpoint[1], hf)
    write_gguf(root / "model.gguf", hf_source(hf))
    convert(hf, root / "orbax", to="orbax", quiet=True)
    return {"hf": hf, "gguf": root / "model.gguf", "orbax": root / "orbax"}


@pytest.fixture(scope="module")
def reference(worker, bases) -> dict[str, np.ndarray]:
    """The logits of each original checkpoint (the first loads also warm the worker up)."""
    logits = {}
    for kind, path in bases.items():
        answer = worker.load(path, f"original {kind}")
        assert "logits" in answer, answer
        logits[kind] = np.asarray(answer["logits"])
    return logits


def check_outcome(answer: dict[str, Any], path: Path, what: str, expected: np.ndarray | None) -> str:
    """Assert a load succeeded with `expected` logits (any logits if None) or failed clearly; 'ok' or 'error'."""
    if "logits" in answer:
        if expected is not None:
            np.testing.assert_array_equal(np.asarray(answer["logits"]), expected, err_msg=f"{what}: loaded, other logits")
        return "ok"
    assert answer["error"] in CLEAR, f"{what}: {answer['error']} is not a clear error:\n{answer['trace']}"
    assert "MemoryError" not in answer["chain"], f"{what}: ran out of its memory budget:\n{answer['trace']}"
    message = answer["message"]
    assert str(path) in message, f"{what}: the error does not name {path}: {message}"
    assert "\n" not in message, f"{what}: the error is not one line: {message}"
    return "error"


# --- safetensors + config.json ---------------------------------------------------------------

_HUGE = [0, -1, 10**9, 2**31, 2**64, 1.5, "7", [], {}, True, math.nan, None]


def _config_mutations(config: dict[str, Any], rng: random.Random) -> tuple[str, Any]:
    sizes = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size"]  # fmt: skip
    floats = ["rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"]
    ids = ["eos_token_id", "bos_token_id", "pad_token_id"]
    free = ["sliding_window", "max_position_embeddings"]  # valid changes keep the logits of 6 tokens
    key = rng.choice(sizes + floats + ids + free + ["layer_types", "rope_parameters", "model_type"])
    value = config.get(key)
    if key in sizes:
        choices = [v for v in _HUGE if v is not None] + [value + 1, value * 2, float(value)]
    elif key in floats:
        choices = [0, -1, 0.0, -0.5, math.nan, math.inf, "x", [], True]
    elif key in ids:
        choices = [-1, 10**9, config["vocab_size"], 1.5, "x", [], True]
    elif key in free:
        choices = _HUGE + [value + 1, value * 2]
    elif key == "layer_types":
        choices = [[], ["foo"] * len(value), value[:-1], value + ["full_attention"], "x", list(range(len(value))), None]
    elif key == "rope_parameters":
        choices = [[], "x", {"rope_type": "yarn"}, {"rope_theta": 0}, {"rope_theta": -1.0}, {"full_attention": 3}]
    else:
        choices = ["gemma9", 3, None, ""]
    return key, rng.choice(choices)


def _write_safetensors(file: Path, header: Any, data: bytes, length: int | None = None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob) if length is None else length % 2**64) + blob + data)


def _safetensors_mutation(header: dict[str, Any], rng: random.Random) -> tuple[str, Any, int | None]:
    """A mutated copy of the header (a dict, or raw bytes) and an optional wrong length; with a description."""
    header = json.loads(json.dumps(header))
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["shape", "shape", "dtype", "offsets", "offsets", "length", "drop", "bytes", "rank"])
    if kind == "shape":
        k = rng.randrange(len(entry["shape"]))
        entry["shape"][k] = rng.choice([0, 1, entry["shape"][k] + 1, entry["shape"][k] - 1, 2**31, 2**63 - 1, -1, "x", 1.5, None])
        return f"{name} shape -> {entry['shape']}", header, None
    if kind == "rank":
        entry["shape"] = rng.choice([[], entry["shape"] + [1], entry["shape"][:-1], [math.prod(entry["shape"])]])
        return f"{name} shape -> {entry['shape']}", header, None
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "I32", "U32", "U8", "F64", "BOOL", "F8_E4M3", "XX", 5, None])
        return f"{name} dtype -> {entry['dtype']}", header, None
    if kind == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[a + 1, b], [a, b + 1], [b, a], [0, b], [a, 2**40], [a, -1], [a], "x", [a, b, b]])
        return f"{name} data_offsets -> {entry['data_offsets']}", header, None
    if kind == "length":
        true = len(json.dumps(header).encode())
        true += -true % 8
        length = rng.choice([true + 1, true - 1, true + 8, 0, 7, 2**40, 2**64 - 1, 2**63])
        return f"header length {true} -> {length}", header, length
    if kind == "drop":
        del header[name]
        return f"{name} dropped from the header", header, None
    raw = bytearray(json.dumps(header).encode())
    at = rng.randrange(len(raw))
    raw[at : at + 1] = rng.choice([b"\xff", b"\x00", b"{", b'"', b"\xc3"])
    return f"header byte {at} -> {bytes(raw[at:at + 1])!r}", bytes(raw), None


def test_fuzz_safetensors_and_config(worker, bases, reference, tmp_path):
    rng = random.Random(1234)
    base = bases["hf"]
    raw = (base / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    config = json.loads((base / "config.json").read_text())
    outcomes = []
    for case in range(60):
        ckpt = tmp_path / f"case{case}"
        shutil.copytree(base, ckpt)
        if case % 2:
            key, value = _config_mutations(config, rng)
            what = f"config.json {key} -> {value!r}"
            (ckpt / "config.json").write_text(json.dumps({**config, key: value}))
        else:
            what, mutated, length = _safetensors_mutation(header, rng)
            _write_safetensors(ckpt / "model.safetensors", mutated, data, length)
        outcomes.append(check_outcome(worker.load(ckpt, f"case {case}: {what}"), ckpt, f"case {case}: {what}", reference["hf"]))
        shutil.rmtree(ckpt)
    assert outcomes.count("error") >= 40, outcomes  # the mutations mostly break the checkpoint: they are exercised


# --- GGUF ------------------------------------------------------------------------------------


def _fields(file: Path) -> tuple[list[tuple[str, int, np.dtype, bool]], int]:
    """(description, byte offset, integer type, whether the edit can leave a valid model with other logits) of every
    integer worth mutating, and the architecture."""
    reader = gguf.GGUFReader(file)
    start = reader.data.__array_interface__["data"][0]
    at = lambda part: part.__array_interface__["data"][0] - start
    arch = reader.fields["general.architecture"].contents()
    targets = [("tensor_count", 8, np.dtype("<u8"), False), ("kv_count", 16, np.dtype("<u8"), False)]
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key.startswith(f"{arch}.") or key.endswith("_token_id"):
            part = field.parts[field.data[0]]
            if np.issubdtype(part.dtype, np.integer):  # a float (eps, rope base, caps) takes any value validly
                # a changed window (e.g. 1) is a valid model with other logits
                targets.append((f"{key} value", at(part), part.dtype, key.endswith("sliding_window")))
            # a float read as an int (or back) can be a valid value of another model
            targets.append((f"{key} value type", at(field.parts[2]), field.parts[2].dtype, True))
        if field.types[0] == gguf.GGUFValueType.ARRAY:  # parts: key length, key, type, item type, count, items
            targets.append((f"{key} item type", at(field.parts[3]), field.parts[3].dtype, False))
            targets.append((f"{key} count", at(field.parts[4]), field.parts[4].dtype, False))
        targets.append((f"{key} key length", at(field.parts[0]), field.parts[0].dtype, False))
    for tensor in reader.tensors:
        _, _, n_dims, dims, kind, offset = tensor.field.parts
        targets.append((f"{tensor.name} n_dims", at(n_dims), n_dims.dtype, False))
        targets += [(f"{tensor.name} dim {k}", at(dims) + 8 * k, dims.dtype, False) for k in range(len(dims))]
        targets.append((f"{tensor.name} type", at(kind), kind.dtype, True))
        targets.append((f"{tensor.name} data offset", at(offset), offset.dtype, True))
    return targets, arch


def _group(what: str) -> str:
    if what in ("tensor_count", "kv_count"):
        return "counts"
    return "tensors" if what.startswith(("blk.", "token_embd", "output_norm")) else "metadata"


def test_fuzz_gguf(worker, bases, reference, tmp_path):
    rng = random.Random(5678)
    base = bases["gguf"].read_bytes()
    targets, _ = _fields(bases["gguf"])
    outcomes = []
    for case in range(60):
        group = rng.choice(["counts", "metadata", "metadata", "tensors"])  # metadata is rarer than tensor fields
        what, offset, dtype, valid_variant = rng.choice([t for t in targets if _group(t[0]) == group])
        old = int(np.frombuffer(base, dtype, 1, offset)[0])
        top = 2 ** (8 * dtype.itemsize) - 1
        new = rng.choice([0, 1, old + 1, max(old - 1, 0), old * 2, 10**9, 2**31, top, rng.randrange(top + 1), 32 * rng.randrange(64)])
        new = min(new, top)
        file = tmp_path / f"case{case}.gguf"
        data = bytearray(base)
        data[offset : offset + dtype.itemsize] = np.array(new, dtype).tobytes()
        file.write_bytes(data)
        desc = f"case {case}: {what} {old} -> {new}"
        expected = None if valid_variant else reference["gguf"]
        outcomes.append(check_outcome(worker.load(file, desc), file, desc, expected))
        file.unlink()
    assert outcomes.count("error") >= 40, outcomes


# --- the size fields of issue #16, item 8, each a few bytes from a valid file ----------------


def _edit_gguf(base: Path, dest: Path, edits: dict[str, int]) -> Path:
    """`base` with the integers described as `_fields` names them set to new values."""
    targets, _ = _fields(base)
    data = bytearray(base.read_bytes())
    for what, value in edits.items():
        [(_, offset, dtype, _)] = [t for t in targets if t[0] == what]
        data[offset : offset + dtype.itemsize] = np.array(value, dtype).tobytes()
    dest.write_bytes(data)
    return dest


def test_huge_counts_are_refused_within_bounds(worker, bases, reference, tmp_path):
    cases = {}
    config = json.loads((bases["hf"] / "config.json").read_text())
    for name, edit in {"no-layer-types": {"layer_types": None}, "layer-types": {}}.items():
        ckpt = cases[f"config.json {name}"] = tmp_path / name
        shutil.copytree(bases["hf"], ckpt)
        hf = {k: v for k, v in {**config, **edit, "num_hidden_layers": 10**9}.items() if v is not None}
        (ckpt / "config.json").write_text(json.dumps(hf))
    ckpt = cases["gemma_config.json"] = tmp_path / "orbax"
    shutil.copytree(bases["orbax"], ckpt)
    meta = json.loads((ckpt / "gemma_config.json").read_text())
    meta["config"]["num_layers"] = 10**9
    (ckpt / "gemma_config.json").write_text(json.dumps(meta))
    (ckpt / MANIFEST_FILE).unlink()  # else its checksum of the config refuses the edit first (tests/test_checksums.py)
    arch = gguf.GGUFReader(bases["gguf"]).fields["general.architecture"].contents()
    cases["gguf block_count"] = _edit_gguf(bases["gguf"], tmp_path / "layers.gguf", {f"{arch}.block_count value": 10**9})
    for what, path in cases.items():
        answer = worker.load(path, what)
        assert check_outcome(answer, path, what, None) == "error"
        assert "1000000000" in answer["message"], answer["message"]
    # gguf reads array items past the end of the file as empty arrays: a byte array's count then
    # drove an endless loop (filling memory) instead of an error
    edits = {"tokenizer.ggml.scores item type": int(gguf.GGUFValueType.UINT8), "tokenizer.ggml.scores count": 2**60}
    path = _edit_gguf(bases["gguf"], tmp_path / "count.gguf", edits)
    assert check_outcome(worker.load(path, "byte array of 2^60 items"), path, "byte array of 2^60 items", None) == "error"


def test_backtracking_ignore_pattern_loads_in_bounded_time(worker, bases, reference, tmp_path):
    """compressed-tensors `ignore` regexes: "(.*.*)*Z" takes Python's re hours on a 31-character module name."""
    path = save_compressed_tensors(tmp_path / "w8a8", hf_source(bases["hf"]))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:(.*.*)*Z", "re:model[.]layers[.]9.*"]
    (path / "config.json").write_text(json.dumps(config))
    answer = worker.load(path, "ignore pattern (.*.*)*Z")
    assert "logits" in answer, answer
