"""Read ``torch.save`` files (zip and legacy formats) without running code from them.

Released tokenizers come as pickles: OpenAI's DALL-E ``encoder.pkl`` is a whole pickled module (legacy
``torch.save`` format), BEiT v2's ``.pth`` files are zip-format pickles of ``{'model': state_dict}``.
``torch.load`` would import and call whatever globals the pickle names. Here every global goes through
an allow-list:

* tensor rebuild functions and storage types -> our own rebuilders (raw bytes, ``torch.frombuffer``);
* ``collections.OrderedDict``, ``set``, ``torch.device`` -> harmless builtins;
* known module classes (``dall_e.*``, ``torch.nn`` containers/activations/pools) and
  ``argparse.Namespace`` -> ``Record`` subclasses: inert objects whose ``__dict__`` receives the pickled
  state (``_parameters``, ``_buffers``, ``_modules``), never the real class.

Any other global is refused with ``UnsafeCheckpointError`` naming it, before anything is called.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from tokenizer.base import TokenizerLoadError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

# Module classes a released tokenizer pickle may name; they become inert records.
RECORD_CLASSES = {
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.activation.ReLU", "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.upsampling.Upsample", "argparse.Namespace",
}


class UnsafeCheckpointError(TokenizerLoadError):
    """A pickle names a global outside the allow-list; nothing from it was run."""


class Record:
    """An inert stand-in for a pickled object: ``__dict__`` holds its state, ``qualname`` its class."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.qualname}: unexpected pickled state of type {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<record {self.qualname}>"


_RECORD_TYPES: dict[str, type] = {}


def _record_type(qualname: str) -> type:
    if qualname not in _RECORD_TYPES:
        _RECORD_TYPES[qualname] = type(qualname.rsplit(".", 1)[-1], (Record,), {"qualname": qualname})
    return _RECORD_TYPES[qualname]


class _Storage:
    """A storage named by a persistent id; its bytes arrive now (zip) or after the main pickle (legacy)."""

    def __init__(self, dtype: torch.dtype, numel: int, key: str):
        self.dtype, self.numel, self.key = dtype, numel, key
        self.tensor: torch.Tensor | None = None  # flat, filled by the reader


class _TensorRef:
    """A tensor to build once its storage's bytes are known."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def build(self) -> torch.Tensor:
        flat = self.storage.tensor
        if flat is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key} has no data in the file")
        if self.size and max(self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride)) + 1, 0) > flat.numel():
            raise pickle.UnpicklingError(f"tensor of shape {list(self.size)} overruns its storage {self.storage.key}")
        return torch.as_strided(flat, self.size, self.stride, self.offset).clone()


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *_ignored: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data  # a Parameter's tensor is all we need


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


class _DtypeMarker:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "device"): _device,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str, storage_bytes):
        super().__init__(file)
        self.source = source
        self.storage_bytes = storage_bytes  # key -> bytes (zip) or None (legacy: filled later)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if module == "torch" and name in _STORAGE_DTYPES:
            return _DtypeMarker(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        qualname = f"{module}.{name}"
        if qualname in RECORD_CLASSES:
            return _record_type(qualname)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to unpickle global {qualname!r}: not on the allow-list of tensor, container "
            f"and known tokenizer module types (no code from a checkpoint is run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if pid[0] == "module":  # legacy format: (tag, class, source file, source); the class came through find_class
            if not (len(pid) > 1 and isinstance(pid[1], type) and issubclass(pid[1], Record)):
                raise pickle.UnpicklingError(f"unexpected module persistent id {pid[:2]!r}")
            return pid[1]
        if pid[0] != "storage" or len(pid) < 5 or not isinstance(pid[1], _DtypeMarker):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid[:2]!r}")
        dtype, key, numel = pid[1].dtype, str(pid[2]), int(pid[4])
        if key not in self.storages:
            st = _Storage(dtype, numel, key)
            if self.storage_bytes is not None:
                raw = self.storage_bytes(key)
                st.tensor = _flat(raw, dtype, f"{self.source}: storage {key}")
            self.storages[key] = st
        st = self.storages[key]
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy views into a larger storage: (view key, offset, size)
            raise pickle.UnpicklingError(f"storage views are not supported (storage {key})")
        return st


def _flat(raw: bytes, dtype: torch.dtype, where: str) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if len(raw) % size:
        raise pickle.UnpicklingError(f"{where}: {len(raw)} bytes is not a whole number of {dtype} elements")
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _materialise(obj: Any, seen: dict[int, Any] | None = None) -> Any:
    """Replace every ``_TensorRef`` in the object graph by its tensor."""
    seen = {} if seen is None else seen
    if isinstance(obj, _TensorRef):
        return obj.build()
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for k in list(obj):
            obj[k] = _materialise(obj[k], seen)
        return obj
    if isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_materialise(v, seen) for v in obj]
        return obj
    if isinstance(obj, tuple):
        out = tuple(_materialise(v, seen) for v in obj)
        seen[id(obj)] = out
        return out
    if isinstance(obj, Record):
        seen[id(obj)] = obj
        _materialise(obj.__dict__, seen)
    return obj


def load_checkpoint_file(path: str | Path) -> Any:
    """The object in a ``torch.save`` file (zip or legacy format), tensors on CPU; refuses unknown globals."""
    path = str(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            obj = _load_zip(data, path)
        else:
            obj = _load_legacy(data, path)
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, KeyError, ValueError,
            TypeError, AttributeError, IndexError, RuntimeError, OverflowError, RecursionError) as e:
        raise TokenizerLoadError(f"{path}: not a readable torch.save checkpoint ({type(e).__name__}: {e})") from None
    return obj


def _load_zip(data: bytes, path: str) -> Any:
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise pickle.UnpicklingError(f"expected one data.pkl in the archive, found {len(pkl)}")
    prefix = pkl[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
        raise pickle.UnpicklingError("big-endian checkpoints are not supported")
    unpickler = _SafeUnpickler(io.BytesIO(zf.read(pkl[0])), path, lambda key: zf.read(f"{prefix}data/{key}"))
    return _materialise(unpickler.load())


def _load_legacy(data: bytes, path: str) -> Any:
    # Layout: pickles of (magic, protocol, sys info), the object (storages as persistent ids), the list of
    # storage keys; then per key an int64 element count and the raw little-endian bytes.
    f = io.BytesIO(data)

    def load_one() -> Any:
        return _SafeUnpickler(f, path, None).load()  # each through the allow-list

    if load_one() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("neither a zip archive nor a legacy torch.save file (bad magic number)")
    protocol = load_one()
    if protocol != LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f"legacy protocol version {protocol} is not supported")
    sys_info = load_one()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian checkpoints are not supported")
    main = _SafeUnpickler(f, path, None)
    obj = main.load()
    for key in load_one():
        st = main.storages.get(str(key))
        if st is None:
            raise pickle.UnpicklingError(f"storage {key} is listed but not used")
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * torch.empty((), dtype=st.dtype).element_size()
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise pickle.UnpicklingError(f"storage {key}: file truncated ({len(raw)} of {nbytes} bytes)")
        st.tensor = _flat(raw, st.dtype, f"{path}: storage {key}")
    return _materialise(obj)


# --- reading records ----------------------------------------------------------------------------
def module_state(record: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict``-style names -> tensors of a pickled module record (parameters and buffers)."""
    if not isinstance(record, Record):
        raise TypeError(f"expected a pickled module, got {type(record).__name__}")
    out: dict[str, torch.Tensor] = {}
    for field in ("_parameters", "_buffers"):
        for name, t in (record.__dict__.get(field) or {}).items():
            if t is not None:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
                out[prefix + name] = t
    for name, child in (record.__dict__.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state(child, f"{prefix}{name}."))
    return out


def module_classes(record: Any, prefix: str = "") -> dict[str, str]:
    """Submodule path -> pickled class name (``""`` is the record itself)."""
    out = {prefix.rstrip("."): getattr(record, "qualname", type(record).__name__)}
    if isinstance(record, Record):
        for name, child in (record.__dict__.get("_modules") or {}).items():
            if child is not None:
                out.update(module_classes(child, f"{prefix}{name}."))
    return out
