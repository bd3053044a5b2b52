"""Read and write GGUF (llama.cpp) Gemma 1/2/3 and Gemma 3n checkpoints, one tensor at a time (a `TensorSource` each way).

A GGUF file holds the weights, the hyper-parameters (as metadata keys) and the tokenizer
(as token/score/type arrays). The conventions below were checked against the real Gemma 3
270M GGUF (logit parity with `transformers`) and llama.cpp's converter (`convert_hf_to_gguf.py`):

- Names: the model family's schema gives each tensor's GGUF name beside its HF name (the names of
  gguf's own `TensorNameMap`, which llama.cpp's converter uses); both directions read it. A row
  marked `gguf_stacked` (Gemma 3n's AltUp projections) is one GGUF tensor holding the row's "{i}"
  tensors stacked on axis 0: a read slices it, a write gathers the parts (consecutive in HF order).
- Layout: GGUF lists dimensions fastest-first (ggml's `ne`); in numpy (C) order a tensor is
  exactly HF's (`[out, in]` for projections, `[V, D]` for the embedding), so `TensorSpec`
  converts it. Gemma's q/k are not permuted (llama.cpp permutes only llama-family RoPE).
- Every zero-centred RMSNorm weight (the schema's `norm="zero_centred"`, Gemma 3's q/k norms
  included) is stored as `w + 1`, since llama.cpp multiplies by the weight where Gemma uses `1 + w`.
- Hyper-parameters <-> metadata keys are the family's (`models/<family>/gguf_meta.py`), including
  what GGUF does not record. Saving refuses a config that a reload (or llama.cpp) would read back
  differently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import gguf
import ml_dtypes  # noqa: F401  -- registers "bfloat16" with numpy, for `dtype`
import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as Q
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_jax.checkpoint.registry import Format, WriteOptions, register
from gemma_jax.checkpoint.source import Put, TensorSource, collect, params_source
from gemma_jax.checkpoint.staging import refuse_existing, staged_file
from gemma_jax.models import FAMILIES, Config, Family, TensorSpec, family_of
from gemma_jax.models.family import check_layer_count, listing
from gemma_jax.tokenizer import Tokenizer

SaveType = Literal["f32", "f16", "bf16", "q8_0"]
_SAVE = {  # type -> (GGML type of matrices, general.file_type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
_PIECE = sp_pb2.ModelProto.SentencePiece  # its Type numbers are GGUF's token types (1 normal ... 6 byte)



def gguf_source(path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None) -> TensorSource:
    """Open a llama.cpp GGUF of a Gemma 1/2/3 or Gemma 3n model (arch gemma, gemma2, gemma3, gemma3n) for streaming.

    Metadata, names and shapes are all checked first, and any failure is a ValueError naming the
    file. Each read dequantizes one tensor (any type gguf can) from the memory-mapped file to
    float32, then casts it to `dtype` (default float32): memory stays near one tensor.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist")
    try:
        reader = GGUFFileReader(file)
        meta = _metadata(reader)
    except Exception as e:  # GGUFReader signals malformed input with assorted error types
        raise ValueError(f"{file}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e
    blocks = meta.get(f"{meta.get('general.architecture')}.block_count")
    if isinstance(blocks, int):  # before a config builds anything per layer
        check_layer_count(blocks, len(reader.tensors), file)
    try:
        config = _family_for_arch(meta.get("general.architecture")).gguf.config_from_metadata(meta)
        tokenizer = _tokenizer_from_metadata(meta)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    layout = _gguf_tensors(config)
    tensors = {t.name: t for t in reader.tensors}
    _validate(file, tensors, layout, meta["general.architecture"])
    misaligned = [t.name for t in reader.tensors if (t.data_offset - reader.data_offset) % reader.alignment]
    if misaligned:
        raise ValueError(f"{file}: the data of tensor {misaligned[0]} is not aligned to {reader.alignment} bytes, "
                         "as GGUF requires: the file is corrupt")  # fmt: skip
    names = {spec.hf_name: name for name, parts in layout.items() for spec in parts}
    cast = np.dtype(np.float32 if dtype is None else dtype)
    del reader, meta  # the parsed metadata (the vocabulary: ~0.4 GB of small arrays for Gemma 3) is not needed any more

    def read(spec: TensorSpec) -> np.ndarray:
        tensor = tensors[names[spec.hf_name]]
        data = tensor.data[spec.index] if spec.param.gguf_stacked else tensor.data
        try:
            x = _dequantize(data, tensor.tensor_type, np.float32 if _is_norm(spec) else cast)
        except NotImplementedError as e:
            kind = tensor.tensor_type.name
            raise ValueError(f"{file}: tensor {tensor.name} has type {kind}, which gguf cannot dequantize") from e
        return spec.to_ours(x - 1.0 if _is_norm(spec) else x).astype(cast, copy=False)

    specs = [spec for parts in layout.values() for spec in parts]
    return TensorSource(config, {s.path: cast for s in specs}, read, tokenizer.model_proto, origin=str(file))


_DEQUANTIZE_BLOCK_BYTES = 4 << 20
_DEQUANTIZE_THREADS = min(8, os.cpu_count() or 1)  # numpy releases the GIL in gguf's block arithmetic


@functools.cache
def _dequantize_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_DEQUANTIZE_THREADS, thread_name_prefix="gguf-dequantize")


def _dequantize(data: np.ndarray, qtype: Q, dtype: np.dtype) -> np.ndarray:
    """Stored values (a tensor's `data`, or a slice of it) as a new array of `dtype` (never a view of the
    file), dequantized in blocks of rows on a few threads (the 270M model's ~270M values: ~1.5x faster on
    2 cores): `gguf.quants.dequantize` of a whole tensor holds every row group's float32 result before
    joining them, twice the tensor; here each thread holds one block."""
    rows = data.reshape(-1, data.shape[-1])
    width = gguf.quants.dequantize(rows[:1], qtype).shape[-1]
    out = _aligned_empty((len(rows), width), dtype)
    step = max(1, _DEQUANTIZE_BLOCK_BYTES // (width * 4))

    def block(start: int) -> None:
        out[start : start + step] = gguf.quants.dequantize(rows[start : start + step], qtype)

    list(_dequantize_pool().map(block, range(0, len(rows), step)))
    return out.reshape(*data.shape[:-1], width)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary: XLA:CPU adopts such
    a buffer in `jax.device_put` instead of copying it (numpy's own large arrays are 16-byte aligned)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def load_gguf(
    path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None, put: Put | None = None
) -> tuple[Config, dict[str, Any], Tokenizer]:
    """A whole GGUF as (config, params, tokenizer); `put(path, array)` may place each tensor as it is made."""
    source = gguf_source(path, dtype=dtype)
    return source.config, collect(source, put), Tokenizer(source.tokenizer)


def save_gguf(
    path: str | os.PathLike[str],
    config: Config,
    params: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    type: SaveType = "f32",
    overwrite: bool = False,
) -> Path:
    """`write_gguf` for a param tree in memory."""
    return write_gguf(path, params_source(config, params, tokenizer.model_proto), type=type, overwrite=overwrite)


def write_gguf(path: str | os.PathLike[str], source: TensorSource, *, type: SaveType = "f32", overwrite: bool = False) -> Path:
    """Write a GGUF that llama.cpp runs and `load_gguf` restores (the same config, params within `type`'s error).

    Matrices are stored as `type`; norms and other 1-D tensors stay F32, and a matrix whose rows
    do not fill whole Q8_0 blocks falls back to F16, as llama.cpp's converter does. Tensors are
    read, converted and written one at a time into a temporary sibling file renamed into place at the end.
    """
    dest, config = Path(path), source.config
    refuse_existing(dest, overwrite)
    if type not in _SAVE:
        raise ValueError(f"unknown GGUF type {type!r}; choose one of {', '.join(_SAVE)}")
    family = family_of(config)
    if family.gguf is None or config.model_type not in family.gguf.ARCHS:
        raise ValueError(f"model_type {config.model_type!r} has no GGUF architecture")
    if not config.head.is_lm:  # llama.cpp has no tensor name for a classifier's score head
        raise ValueError(f"GGUF holds causal LMs only; this is a {config.head.task} checkpoint (convert it to hf or orbax)")
    if source.tokenizer is None:
        raise ValueError("GGUF files embed the tokenizer, and the source has no tokenizer.model")
    source = family.gguf.stored(source)
    config = source.config
    meta = _metadata_for(family, config, Tokenizer(source.tokenizer), type)
    _check_representable(config, family.gguf.config_from_metadata(meta), meta["general.architecture"])
    layout = _gguf_tensors(config)
    shapes = {name: _gguf_shape(parts) for name, parts in layout.items()}
    qtypes = {name: _storage_type(shape, _SAVE[type][0]) for name, shape in shapes.items()}
    names = {spec.hf_name: name for name, parts in layout.items() for spec in parts}

    writer = gguf.GGUFWriter(None, meta["general.architecture"])
    for key, value in meta.items():
        if key != "general.architecture":  # the writer adds it itself
            _add_kv(writer, key, value)
    for name, shape in shapes.items():  # the same (HF) order the source yields tensors in
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtypes[name]))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtypes[name])
    with staged_file(dest, overwrite=overwrite) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            parts: list[np.ndarray] = []  # a stacked tensor's parts read so far
            for spec, x in source:
                x = spec.to_hf(np.asarray(x, np.float32))
                parts.append(x + 1.0 if _is_norm(spec) else x)
                name = names[spec.hf_name]
                if len(parts) == len(layout[name]):
                    data = np.stack(parts) if spec.param.gguf_stacked else parts[0]
                    writer.write_tensor_data(gguf.quants.quantize(data, qtypes[name]))
                    parts = []
        finally:
            writer.close()
    return dest


# --- names, types, validation ----------------------------------------------------------------


def _gguf_tensors(config: Config) -> dict[str, tuple[TensorSpec, ...]]:
    """GGUF tensor name -> the specs it holds (one, or a stacked row's, in index order), from the family's schema."""
    specs = family_of(config).tensor_specs(config)
    unnamed = [s.hf_name for s in specs.values() if s.gguf_name is None]
    if unnamed:
        raise ValueError(f"{config.model_type} tensors {listing(unnamed)} have no GGUF name")
    layout: dict[str, list[TensorSpec]] = {}
    for spec in specs.values():
        layout.setdefault(spec.gguf_name, []).append(spec)
    for name, parts in layout.items():  # a schema error, not a file's
        stacked = parts[0].param.gguf_stacked
        if [s.index if stacked else None for s in parts] != (list(range(len(parts))) if stacked else [None]):
            raise AssertionError(f"GGUF tensor {name} is not one tensor nor a stack of indices 0..n-1")
    return {name: tuple(parts) for name, parts in layout.items()}


def _gguf_shape(parts: tuple[TensorSpec, ...]) -> tuple[int, ...]:
    """A GGUF tensor's shape (numpy order): its spec's HF shape, behind the stack's length if stacked."""
    return ((len(parts),) if parts[0].param.gguf_stacked else ()) + parts[0].hf_shape


def _family_for_arch(arch: Any) -> Family:
    for family in FAMILIES:
        if family.gguf is not None and arch in family.gguf.ARCHS.values():
            return family
    known = [a for f in FAMILIES if f.gguf is not None for a in f.gguf.ARCHS.values()]
    raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(known)}")


def _is_norm(spec: TensorSpec) -> bool:
    """llama.cpp's converter adds 1 to every zero-centred RMSNorm weight (it multiplies by w, Gemma by 1 + w)."""
    return spec.param.norm == "zero_centred"


def _storage_type(shape: tuple[int, ...], qtype: Q) -> Q:
    """As llama.cpp's converter: 1-D tensors (norms) stay F32, and a matrix whose rows are not
    whole quantisation blocks (ggml quantises along rows) falls back to F16."""
    if len(shape) == 1:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return Q.F16 if shape[-1] % block else qtype


def _validate(file: Path, tensors: Mapping[str, Any], layout: Mapping[str, tuple[TensorSpec, ...]], arch: str) -> None:
    unexpected = [name for name in tensors if name not in layout]
    if unexpected:
        raise ValueError(f"{file}: unexpected tensors for this {arch} model: {listing(unexpected)}")
    missing = [name for name in layout if name not in tensors]
    if missing:
        raise ValueError(f"{file}: missing tensors {listing(missing)}")
    for name, parts in layout.items():
        shape, expected = tuple(int(d) for d in reversed(tensors[name].shape)), _gguf_shape(parts)  # GGUF lists ne
        if shape != expected:
            raise ValueError(
                f"{file}: tensor {name} has shape {list(shape)} ({math.prod(shape)} elements), "
                f"but the metadata implies {list(expected)} ({math.prod(expected)})"
            )


class GGUFFileReader(gguf.GGUFReader):
    """GGUFReader that parses faster, never reads past the end of the file, and whose tensor
    errors (data cut off, sizes that do not fit the type) name the tensor."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        # A plain-ndarray view of the same mapping: slicing an np.memmap costs ~4x more, which
        # dominates parsing Gemma's 262k tokenizer strings (~20 s -> ~5 s).
        self._data = mapped.view(np.ndarray)

    def _get(self, offset: int, dtype: npt.DTypeLike, count: int = 1, override_order: Any = None) -> np.ndarray:
        """gguf's read, refusing to go past the end of the file: gguf returns a short (even empty)
        array there, so a count edited to 10^18 would loop (and allocate) for ever instead of failing."""
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if offset < 0 or end > len(self._data):
            raise ValueError(f"the header reads {int(count)} x {np.dtype(dtype).name} at byte {offset}, "
                             f"past the end of the file ({len(self._data)} bytes)")  # fmt: skip
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        """gguf's parts of one metadata value, but an array in one pass: gguf parses arrays element by element
        (a few numpy views each), which made reading Gemma's 262k-entry vocabulary take ~5 s. An array of
        numbers is one part here (`contents()` flattens the parts it indexes, so it reads the same); an array of
        strings keeps gguf's length and bytes parts per string, located from the lengths with `struct`."""
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        itype, count, offs = gguf.GGUFValueType(int(raw_itype[0])), int(length[0]), orig_offs + 12
        types = [gguf.GGUFValueType.ARRAY, itype]
        if itype in self.gguf_scalar_to_np:
            values = self._get(offs, self.gguf_scalar_to_np[itype], count)
            return 12 + values.nbytes, [raw_itype, length, values], [2] if count else [], types
        if itype != gguf.GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)  # nested arrays: gguf's own way
        data, size = self._data, len(self._data)
        order = "<" if (self.byte_order == "I") == (sys.byteorder == "little") else ">"
        unpack = struct.Struct(f"{order}Q").unpack_from
        lengths_type = np.dtype(np.uint64).newbyteorder(order)
        parts: list[np.ndarray] = [raw_itype, length]
        for _ in range(count):
            end = offs + 8 + (unpack(data, offs)[0] if offs + 8 <= size else 0)
            if end > size:
                raise ValueError(f"the header reads a string at byte {offs}, past the end of the file ({size} bytes)")
            parts += (data[offs : offs + 8].view(lengths_type), data[offs + 8 : end])
            offs = end
        return offs - orig_offs, parts, list(range(3, len(parts), 2)), types

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        try:
            super()._build_tensors(start_offs, fields)
        except ValueError:
            for field in fields:  # only on failure: find the culprit
                try:
                    super()._build_tensors(start_offs, [field])
                except ValueError as e:
                    name = bytes(field.parts[1]).decode(errors="replace")
                    raise ValueError(f"tensor {name} does not fit the file ({e})") from e
            raise


# --- metadata <-> config ---------------------------------------------------------------------


def _f32(x: float) -> float:
    """The shortest decimal that a float32 key holds, so 1e-6 reads back as 1e-6, not 9.9999997e-07."""
    return float(str(np.float32(x)))


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {
        key: _f32(field.contents()) if field.types == [gguf.GGUFValueType.FLOAT32] else field.contents()
        for key, field in reader.fields.items()
    }


def _metadata_for(family: Family, config: Config, tokenizer: Tokenizer, type: SaveType) -> dict[str, Any]:
    """Everything llama.cpp's converter writes: general.*, the family's hyper-parameters, the tokenizer."""
    if (config.bos_id, config.eos_id, config.pad_id) != (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
        raise ValueError("config and tokenizer disagree on the bos/eos/pad ids")
    general = {"general.architecture": family.gguf.ARCHS[config.model_type], "general.file_type": int(_SAVE[type][1]),
               "general.quantization_version": gguf.GGML_QUANT_VERSION}  # fmt: skip
    return general | family.gguf.metadata_for(config) | _tokenizer_metadata(tokenizer, config.vocab_size)


def _check_representable(config: Config, restored: Config, arch: str) -> None:
    diffs = [
        f"{f.name}={getattr(config, f.name)!r} (GGUF gives {getattr(restored, f.name)!r})"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(restored, f.name)
    ]
    if diffs:
        raise ValueError(f"GGUF ({arch}) cannot represent this config: {'; '.join(diffs)}")


def _add_kv(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Scalars as llama.cpp's converter types them; arrays typed by their first element."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


# --- tokenizer -------------------------------------------------------------------------------
# sentencepiece matches user-defined pieces after escaping spaces to "▁", llama.cpp before it,
# so their spaces are spelled differently in the two formats (e.g. Gemma's run-of-spaces pieces).


def _tokenizer_from_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """A sentencepiece BPE model (byte fallback, identity normalisation) from the GGUF token arrays."""
    if meta.get("tokenizer.ggml.model") != "llama":
        raise ValueError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r} is not sentencepiece ('llama')")
    tokens, scores, types = (meta.get(f"tokenizer.ggml.{k}", []) for k in ("tokens", "scores", "token_type"))
    if not len(tokens) == len(scores) == len(types) or not set(types) <= set(_PIECE.Type.values()):
        raise ValueError("tokenizer.ggml.tokens/scores/token_type differ in length or hold unknown token types")
    defaults = {"unknown": 3, "bos": 2, "eos": 1, "padding": 0}  # Gemma's
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id", d) for k, d in defaults.items()}
    if not all(0 <= i < len(tokens) for i in ids.values()):
        raise ValueError(f"special token ids {ids} out of range for {len(tokens)} tokens")
    proto = sp_pb2.ModelProto()
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind == _PIECE.USER_DEFINED:
            text = text.replace(" ", "▁")
        kind = _PIECE.UNKNOWN if i == ids["unknown"] else kind  # llama.cpp's converter marks <unk> CONTROL
        proto.pieces.add(piece=text, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _PIECE.BYTE in types
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = ids.values()
    pieces = (proto.pieces[i].piece for i in ids.values())
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece, trainer.pad_piece = pieces
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return Tokenizer(proto.SerializeToString())


def _tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer keys; the vocab is padded to the embedding's rows as llama.cpp pads it ([PADn], unused)."""
    # Tokenizer has no public accessor for its model proto.
    proto = sp_pb2.ModelProto.FromString(tokenizer.model_proto)
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise ValueError("only BPE sentencepiece tokenizers (as Gemma's) can be written: GGUF does not say which kind")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise ValueError("GGUF sentencepiece tokenizers cannot hold normalisation rules; this tokenizer has some")
    pieces = list(proto.pieces)
    if len(pieces) > vocab_size:
        raise ValueError(f"tokenizer has {len(pieces)} pieces, more than vocab_size={vocab_size}")
    pad = range(len(pieces), vocab_size)
    spelled = [p.piece.replace("▁", " ") if p.type == _PIECE.USER_DEFINED else p.piece for p in pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": spelled + [f"[PAD{i}]" for i in pad],
        "tokenizer.ggml.scores": [p.score for p in pieces] + [-10_000.0] * len(pad),
        "tokenizer.ggml.token_type": [int(p.type) for p in pieces] + [int(_PIECE.UNUSED)] * len(pad),
        "tokenizer.ggml.bos_token_id": tokenizer.bos_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.unknown_token_id": tokenizer.unk_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": norm.add_dummy_prefix,
    }


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _write(dst: Path, source: TensorSource, options: WriteOptions) -> Path:
    widest = max((np.dtype(d) for d in source.dtypes.values()), key=lambda d: d.itemsize)
    kind = options.gguf_type or ("f32" if widest.itemsize == 4 else "bf16")
    return write_gguf(dst, source, type=kind, overwrite=options.overwrite)


register(Format("gguf", "llama.cpp GGUF file (see checkpoint/gguf.py)", _is_gguf, gguf_source, _write))
