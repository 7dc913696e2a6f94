"""Reading and writing checkpoint directories: json files, the shard index,
safetensors headers and tensors, metadata, and destination checks.

Loading has two phases (docs/architecture.md):

* `read_checkpoint(path)` -- the host phase, pure Python, no MLX: it reads and
  validates config.json, generation_config.json, the shard index and every
  safetensors header, and returns a `CheckpointSpec`. It may run on any thread.
* `read_tensors(spec)` -- the MLX phase, on the engine's worker: the tensors
  as lazy MLX arrays, which the architecture's builder then takes.

Every file is opened only once it is known to be a regular file (a FIFO or a
link to /dev/zero would block or never end), json files have size limits,
and weight-map entries must name files inside the checkpoint directory.
`convert` and `train.lora.fuse` write checkpoints with `write_weights`,
`staged_directory`, `check_destination` and `copy_carried`; a full fine-tune
replaces its checkpoint with `staging_directory` and `replace_directory`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from amlx.errors import ModelLoadError
from amlx.notices import stderr_stream

__all__ = [
    "CONFIG", "GENERATION_CONFIG", "INDEX", "JSON_LIMIT", "TOKENIZER_JSON_LIMIT", "CheckpointSpec", "TensorInfo",
    "check_destination", "check_side_files", "copy_carried", "holds_working_directory", "is_working_directory",
    "progress_bar", "read_bytes", "read_checkpoint", "read_header", "read_index", "read_json", "read_tensors",
    "replace_directory", "staged_directory", "staging_directory", "staging_home", "weight_files", "working_directory",
    "write_weights",
]

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
INDEX = "model.safetensors.index.json"
JSON_LIMIT = 16 << 20  # config, generation config, index, tokenizer_config: real ones are kilobytes
TOKENIZER_JSON_LIMIT = 256 << 20  # tokenizer.json of a 256k vocabulary is ~35 MB
HEADER_LIMIT = 100 << 20  # the safetensors format's own cap on its JSON header

# Files other than weights and config.json that a written checkpoint carries over
# (tokenizer, chat template, generation config); never code.
CARRIED_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".jsonl")
# Rewritten (config.json) or misleading (weight indexes, other tools' quantization metadata).
NOT_CARRIED = (CONFIG, "hf_quant_config.json", "quantize_config.json")

# safetensors dtype -> bytes per element
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
             "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}

_FLOATS = {"F16", "BF16", "F32", "F64"}
_MAX_DIM = (1 << 31) - 1


# ---------------------------------------------------------------------------
# regular files only


def _regular(path: Path, limit: int) -> int:
    """The size of `path`, refused unless it is a regular file (after links) of at most `limit` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path}: not a regular file")
    if st.st_size > limit:
        raise ModelLoadError(f"{path}: {st.st_size} bytes, more than the {limit} bytes such a file may have")
    return st.st_size


def read_bytes(path: str | os.PathLike, limit: int = JSON_LIMIT) -> bytes:
    """The content of the regular file `path`, at most `limit` bytes. FileNotFoundError
    when absent; ModelLoadError for anything else (a FIFO, a device, too large)."""
    path = Path(path)
    _regular(path, limit)
    # O_NONBLOCK: should the file have been swapped for a FIFO since the stat, the
    # open does not wait for a writer; the fstat below then refuses it.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelLoadError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModelLoadError(f"{path}: more than the {limit} bytes such a file may have")
    return data


@overload
def read_json(path: str | os.PathLike, *, required: Literal[True] = ..., limit: int = ...) -> dict: ...
@overload
def read_json(path: str | os.PathLike, *, required: bool, limit: int = ...) -> dict | None: ...


def read_json(path: str | os.PathLike, *, required: bool = True, limit: int = JSON_LIMIT) -> dict | None:
    """The JSON object in the regular file `path`; None when absent and not `required`."""
    path = Path(path)
    try:
        raw = read_bytes(path, limit)
    except FileNotFoundError:
        if required:
            raise ModelLoadError(f"{path}: file not found") from None
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, an integer of over 4300 digits
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------
# the shard index and the weight files


def _inside(directory: Path, name: str, where: Path) -> Path:
    """`directory / name` for a plain file name (no separator, not absolute, not
    ``..``). Should the file be a link that leads out of `directory`, it must end at
    a ``.safetensors`` file (weights linked in from another checkpoint) or in the
    Hugging Face cache's blob store (``snapshots/<revision>/<file>`` ->
    ``../../blobs/<hash>``): a link to any other file (keys, /etc/...) is refused."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name) or "\0" in name:
        raise ModelLoadError(f"{where}: weight file {name!r} is not a file name inside the checkpoint directory")
    path = directory / name
    try:
        target = path.resolve()
        home = directory.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise ModelLoadError(f"{where}: weight file {name!r} cannot be resolved: {e}") from None
    if _stays_home(home, target) or target.suffix == ".safetensors":
        return path
    raise ModelLoadError(f"{where}: weight file {name!r} links outside the checkpoint directory to {target}")


def _stays_home(home: Path, target: Path) -> bool:
    """Whether the resolved `target` lies in the resolved checkpoint directory `home`, or in
    the blob store of the Hugging Face cache it is a snapshot of."""
    return home in target.parents or (home.parent.name == "snapshots" and home.parent.parent / "blobs" in
                                      target.parents)


def read_index(directory: Path) -> dict[str, str] | None:
    """The validated weight map (tensor name -> shard file name) of
    ``model.safetensors.index.json``, or None when the checkpoint has none."""
    index = directory / INDEX
    data = read_json(index, required=False)
    if data is None:
        return None
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise ModelLoadError(f"{index}: tensor {tensor!r} maps to {name!r}, not a file name")
        _inside(directory, name, index)
    return weight_map


def weight_files(directory: Path, index_map: dict[str, str] | None) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    if index_map is not None:
        files = sorted(set(index_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise ModelLoadError(f"{directory / INDEX}: shard file(s) missing: {', '.join(missing)}")
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    found = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{directory}: no model.safetensors (or {INDEX} with shards) found")
    return [_inside(directory, f.name, directory) for f in found]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    dtype: str  # safetensors spelling: F32, BF16, U32, ...
    shape: tuple[int, ...]
    file: Path


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors by name, metadata) from the header of the safetensors file `path`,
    checked against the file: known dtypes, byte ranges that fit the shapes, in bounds."""
    try:
        size = _regular(path, 1 << 60)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(HEADER_LIMIT, size - 8):
                raise ModelLoadError(f"{path}: not a safetensors file (header length {n} beyond the file)")
            text = f.read(n)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # (ValueError: bad UTF-8 or JSON, an over-long integer)
        raise ModelLoadError(f"{path}: not a safetensors file (invalid header: {e})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file (the header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor_info(path, name, entry, size - 8 - n) for name, entry in header.items()}
    return tensors, meta if isinstance(meta, dict) else {}


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("invalid header entry")
    if "\0" in name:  # (MLX reads names as C strings: cut short, the load failed as "the file changed")
        raise bad("its name holds a NUL character")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:  # (a list or object: unhashable, a raw TypeError)
        raise bad(f"unknown dtype {dtype!r}")
    # (MLX's dimensions are int32: a larger one, in a tensor of no elements, was wrapped round
    # to another size, negative ones included, and `convert` wrote that out)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM
                                              for d in shape):
        raise bad(f"invalid shape {shape!r} (dimensions are integers from 0 to {_MAX_DIM})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise bad(f"data offsets {offsets!r} lie outside the file's {data_size} data bytes")
    if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
        raise bad(f"{offsets[1] - offsets[0]} bytes do not hold a {dtype} tensor of shape {tuple(shape)}")
    return TensorInfo(dtype, tuple(shape), path)


# ---------------------------------------------------------------------------
# the host phase

# Files beside the weights that loading reads (the tokenizer's among them), with
# their size limits: each must be a regular file when present.
SIDE_FILES = {"tokenizer.json": TOKENIZER_JSON_LIMIT, "tokenizer_config.json": JSON_LIMIT,
              "special_tokens_map.json": JSON_LIMIT, "chat_template.jinja": JSON_LIMIT,
              "chat_template.json": JSON_LIMIT, "tokenizer.model": TOKENIZER_JSON_LIMIT}


def check_side_files(directory: Path) -> None:
    """Refuses (ModelLoadError) a tokenizer or chat template file that is not a
    regular file or is over its size limit, before anything opens it."""
    extra = directory / "additional_chat_templates"
    templates = sorted(extra.glob("*.jinja")) if extra.is_dir() else []
    for path, limit in [*((directory / n, lim) for n, lim in SIDE_FILES.items()),
                        *((t, JSON_LIMIT) for t in templates)]:
        if os.path.lexists(path):
            try:
                _regular(path, limit)
            except FileNotFoundError:
                raise ModelLoadError(f"{path}: a link to nothing") from None


@dataclass
class CheckpointSpec:
    """A checkpoint directory read and validated on the host, before any MLX work."""

    path: Path
    raw_config: dict
    args: Any  # the architecture's ModelArgs (amlx.models.config)
    generation_config: dict | None
    files: list[Path]
    index_map: dict[str, str] | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        """The normalised config as a flat dict (`amlx.models.config.normalize_config`)."""
        import dataclasses

        return dataclasses.asdict(self.args)


def read_checkpoint(path: str | os.PathLike) -> CheckpointSpec:
    """Reads and validates a checkpoint directory's config files, shard index and
    safetensors headers: pure Python, no MLX, safe to run on any thread.

    Raises ModelLoadError naming the file and the cause."""
    from amlx.models.config import parse_config

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (expected a Hugging Face or MLX checkpoint)")
    raw = read_json(path / CONFIG)
    generation = read_json(path / GENERATION_CONFIG, required=False)
    check_side_files(path)
    args = parse_config(raw, path / CONFIG, generation_config=generation)
    index_map = read_index(path)
    files = weight_files(path, index_map)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f)[0].items():
            if name in tensors:
                raise ModelLoadError(f"{f}: tensor {name!r} appears in more than one shard")
            tensors[name] = info
    if index_map:
        for name, listed in index_map.items():
            if name not in tensors or tensors[name].file.name != listed:
                where = "no file holds it" if name not in tensors else f"it is in {tensors[name].file.name}"
                raise ModelLoadError(f"{path / INDEX}: lists tensor {name!r} in {listed}, but that file does not "
                                     f"hold it ({where})")
    for name, scales in tensors.items():
        biases = tensors.get(name[: -len("scales")] + "biases") if name.endswith(".scales") else None
        # (two float types: MLX's quantized matmul would fail mid-request; a non-float one the builder refuses)
        if biases is not None and biases.dtype != scales.dtype and {biases.dtype, scales.dtype} <= _FLOATS:
            raise ModelLoadError(f"{biases.file}: tensor {name[: -len('scales')] + 'biases'!r} is {biases.dtype} but "
                                 f"its layer's scales are {scales.dtype}: a quantized layer's scales and biases must "
                                 f"have one dtype")
    return CheckpointSpec(path, raw, args, generation, files, index_map, tensors)


# ---------------------------------------------------------------------------
# the MLX phase


def read_tensors(spec: CheckpointSpec) -> dict:
    """Every tensor of the checkpoint by name, as lazy MLX arrays (nothing read
    yet). On the engine's worker thread."""
    from amlx._mlx import io
    from amlx.errors import MLXError

    tensors: dict = {}
    try:
        for f in spec.files:
            try:
                arrays, _ = io.load_safetensors(f)
            except MLXError as exc:
                raise ModelLoadError(f"{f}: cannot read safetensors ({exc.mlx_message})") from None
            tensors.update(arrays)
            if set(arrays) != {n for n, t in spec.tensors.items() if t.file == f}:
                raise ModelLoadError(f"{f}: the file changed while it was being loaded")
    except BaseException:
        for a in tensors.values():
            a.close()
        raise
    return tensors


# ---------------------------------------------------------------------------
# writing


def check_destination(src: Path, dst: Path) -> None:
    """`src` must be a checkpoint directory and `dst` a new or empty directory outside it."""
    if not src.is_dir():
        raise ModelLoadError(f"{src}: not a directory (expected a Hugging Face or MLX checkpoint)")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"dst {dst} must lie outside the source checkpoint {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"dst {dst} already exists and is not an empty directory")


def check_creatable(directory: Path) -> None:
    """ValueError when `directory` cannot be made because something in its way is a file:
    the nearest of it and its parents that exists must be a directory."""
    for a in (directory, *directory.parents):
        if a.is_symlink() and not a.exists():  # (a dangling link: a raw OSError once all was written)
            raise ValueError(f"{a} is a link to {os.readlink(a)}, which does not exist")
        if a.exists():
            if not a.is_dir():
                raise ValueError(f"{a} exists and is not a directory")
            return


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def working_directory() -> Path | None:
    """The process's working directory; None when it has been deleted."""
    try:
        return Path.cwd()
    except OSError:
        return None


def is_working_directory(path: Path) -> bool:
    """Whether `path` names the working directory (through links, or as ".")."""
    try:
        return os.path.samefile(path, ".")
    except OSError:  # (either one absent)
        return False


def holds_working_directory(path: Path) -> bool:
    """Whether the working directory lies inside `path` (replacing `path` would delete it)."""
    cwd = working_directory()
    return cwd is not None and path.resolve() in cwd.parents


def staging_home(dst: Path) -> Path:
    """Where a checkpoint for `dst` is written before it is put in place: beside `dst`, or
    inside it when `dst` is the working directory (`replace_directory` then moves its entries)."""
    dst = dst.resolve()
    return dst if is_working_directory(dst) else dst.parent


def staging_directory(dst: Path) -> Path:
    """A new empty directory (in `staging_home`), with the mode a plain mkdir would give,
    to write a checkpoint into before `replace_directory` puts it at `dst`."""
    home = staging_home(dst)
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.resolve().name}.", suffix=".partial", dir=home))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_directory(new: Path, dst: Path) -> None:
    """Puts the complete directory `new` (from `staging_directory`) at `dst`: an older `dst`
    is moved aside first and deleted only after the rename.

    The working directory is not renamed but has its entries moved (config.json out first
    and in last, so a reader finds a whole checkpoint or no config): renaming it away left
    this process, and the shell that started it, in a deleted directory that listed empty
    (and saving into "." was a raw EBUSY). A directory holding the working directory is refused."""
    dst = dst.resolve()
    if holds_working_directory(dst):
        raise ValueError(f"{dst} holds the working directory ({working_directory()}); replacing it would delete "
                         f"the working directory")
    if is_working_directory(dst):
        _replace_entries(new, dst)
        return
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(new, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _config_last(entries: Iterator[Path]) -> list[Path]:
    return sorted(entries, key=lambda e: (e.name == CONFIG, e.name))


def _replace_entries(new: Path, dst: Path) -> None:
    """`replace_directory` for the working directory `dst`, `new` being inside it."""
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst))
    for entry in reversed(_config_last(e for e in dst.iterdir() if e not in (new, old))):
        os.replace(entry, old / entry.name)
    for entry in _config_last(new.iterdir()):
        os.replace(entry, dst / entry.name)
    new.rmdir()
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """A temporary directory to write into (`staging_directory`); it becomes `dst` (which
    must be absent or empty) when the block ends without error, else it is removed.
    So a checkpoint appears only once complete."""
    # the real path: a link to an empty directory is written where it leads (a rename acts
    # on the link itself: a raw NotADirectoryError once everything had been written), and "."
    # (an empty working directory) was staged inside itself, then rmdir(".") a raw OSError
    dst = dst.resolve()
    tmp = staging_directory(dst)
    try:
        yield tmp
        replace_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_carried(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copies the tokenizer, chat template and generation config files of `src`
    (not config.json, weight indexes, code, or the names in `skip`)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name.endswith(CARRIED_SUFFIXES) and f.name not in NOT_CARRIED + skip \
                and not f.name.endswith(".index.json"):
            _carried_inside(src, f)
            (dst / f.name).write_bytes(read_bytes(f, TOKENIZER_JSON_LIMIT))
    # The named chat templates live in a subdirectory (the tokenizer reads
    # additional_chat_templates/*.jinja, check_side_files checks them): without
    # this, a written checkpoint kept only the default template.
    extra = src / "additional_chat_templates"
    templates = sorted(t for t in extra.glob("*.jinja") if t.is_file()) if extra.is_dir() else []
    if templates:
        (dst / extra.name).mkdir()
        for t in templates:
            _carried_inside(src, t)
            (dst / extra.name / t.name).write_bytes(read_bytes(t, JSON_LIMIT))


def _carried_inside(src: Path, f: Path) -> None:
    """Refuses a carried file that is a link leading out of the checkpoint directory (other than
    into the Hugging Face cache's blob store): "notes.txt" -> ~/.ssh/id_rsa in a downloaded
    checkpoint was copied into the written one, ready to be uploaded with it."""
    try:
        target, home = f.resolve(), src.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise ModelLoadError(f"{f}: cannot be resolved: {e}") from None
    if not _stays_home(home, target):
        raise ModelLoadError(f"{f}: links outside the checkpoint directory to {target}; not copied into a "
                             f"written checkpoint (copy the file in, if it belongs there)")


def write_config(directory: Path, config: dict, name: str = CONFIG) -> None:
    (directory / name).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar over `total` tensors (None: shown on a terminal only), or None without tqdm."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover
        return None
    stream = stderr_stream()
    if stream is None:  # (no stderr: tqdm fails on it, then deadlocks in its finalizer)
        return None
    disable = None if progress is None else not progress
    return tqdm(total=total, desc=desc, unit="tensor", disable=disable, leave=False, file=stream)


def _shards(units: list, max_bytes: int) -> list[list]:
    """Units in order, a new shard whenever the next would pass `max_bytes` (mlx-lm's rule)."""
    shards: list[list] = []
    size = 0
    for unit in units:
        nbytes = sum(a.nbytes for _, a in unit[0])
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


def write_weights(out: Path, units: list, n_params: int, max_shard_size: int, desc: str,
                  progress: bool | None) -> None:
    """Writes `units` ([(name, lazy array), ...], source array) as MLX safetensors
    shards plus ``model.safetensors.index.json`` into `out`, one shard in memory at
    a time; every array of a unit (and its source) is closed once written."""
    from amlx._mlx import eval as mx_eval, io

    shards = _shards(units, max_shard_size)
    total_size = sum(a.nbytes for pairs, _ in units for _, a in pairs)
    n = len(shards)
    weight_map: dict[str, str] = {}
    bar = progress_bar(sum(len(pairs) for pairs, _ in units), desc, progress)
    try:
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            arrays: dict = {}
            for pairs, _ in shard:
                mx_eval(*(a for _, a in pairs))
                arrays.update(pairs)
                if bar is not None:
                    bar.update(len(pairs))
            io.save_safetensors(out / fname, arrays, {"format": "mlx"})
            for name, a in arrays.items():
                weight_map[name] = fname
                a.close()
            for _, source in shard:
                source.close()  # its data was read for this shard only
            shard.clear()
    finally:
        if bar is not None:
            bar.close()
    index = {"metadata": {"total_size": total_size, "total_parameters": n_params},
             "weight_map": dict(sorted(weight_map.items()))}
    write_config(out, index, INDEX)
