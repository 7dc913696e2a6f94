"""Model names to checkpoint directories: a local path, or a Hugging Face model id
("org/name") found in the local Hugging Face cache or downloaded into it.

The cache is huggingface_hub's (``HF_HUB_CACHE``, or ``HF_HOME/hub``, by default
``~/.cache/huggingface/hub``): ``models--org--name/snapshots/<revision>/`` with
``refs/main`` naming the revision. A download fetches only the files amlx reads
(configs, tokenizer files, chat templates, safetensors weights).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from amlx.checkpoint import read_bytes
from amlx.errors import ModelLoadError

__all__ = ["resolve_model", "is_model_id", "CHECKPOINT_FILES"]

# What a checkpoint directory needs: configs and tokenizer files (*.json), chat
# templates (*.jinja), weights (*.safetensors). PyTorch .bin / .pth / GGUF are skipped.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja")

# huggingface_hub's repo id rules: one "/" between an owner and a name made of
# letters, digits, "-", "_" and ".".
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_model_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face model id ("org/name")."""
    return bool(_MODEL_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong; for huggingface_hub's wrapper of a
    connection failure, the failure itself."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _incomplete(exc: BaseException) -> str | None:
    """What a cached snapshot lacks when huggingface_hub (2.x, from its cached file listing) found
    it incomplete, e.g. "1 file(s) are missing (model.safetensors)"; None when nothing is cached.
    (The error said "not found in the local Hugging Face cache" of a model that is there.)"""
    from huggingface_hub import errors

    incomplete = getattr(errors, "IncompleteSnapshotError", None)
    if incomplete is None or not isinstance(exc, incomplete):
        return None
    text = str(exc)
    found = re.search(r"is incomplete: (.*?\))\.", text)
    return found.group(1) if found else text.strip().splitlines()[0]


def _check_ref(cache: Path, model_id: str) -> None:
    """Refuses a cached ``refs/main`` that is not a short UTF-8 file: huggingface_hub reads it
    whole with a plain open(), so a FIFO there blocked the load forever, a link to /dev/zero
    never ended, and a directory or binary bytes were a raw IsADirectoryError or
    UnicodeDecodeError."""
    ref = cache / f"models--{model_id.replace('/', '--')}" / "refs" / "main"
    if not os.path.exists(ref):
        return  # (huggingface_hub skips it then)
    try:
        text = read_bytes(ref, 1024).decode("utf-8")
    except FileNotFoundError:
        return  # (gone since)
    except UnicodeDecodeError:
        raise ModelLoadError(f"{ref}: not a revision of the Hugging Face cache (not UTF-8 text)") from None
    # huggingface_hub joins the text onto snapshots/ as it is: "../.." there pointed the load at
    # a folder outside the cache. The Hub writes a commit's 40 hex digits.
    if not re.fullmatch(r"[0-9a-f]{40}", text.strip()):
        raise ModelLoadError(f"{ref}: not a revision of the Hugging Face cache (a commit's 40 hex digits), "
                             f"but {text.strip()[:60]!r}")


# huggingface_hub 2.x's cached file listing of one revision (trees/<commit>.json): a few
# hundred bytes per file of the repository, so megabytes for the largest
_TREE_LIMIT = 64 << 20


def _check_trees(cache: Path, model_id: str) -> None:
    """Refuses a cached file listing (``trees/<commit>.json``) that is not a regular file of at
    most _TREE_LIMIT bytes: huggingface_hub reads the one of the revision it resolves (from
    refs/main offline, from the Hub online) whole with a plain open() and json.load, so a FIFO
    there blocked the load forever and a link to /dev/zero never ended. Each listing is checked,
    since which revision the Hub names is not known before the download asks."""
    trees = cache / f"models--{model_id.replace('/', '--')}" / "trees"
    try:
        names = sorted(os.listdir(trees))
    except OSError:  # none (never downloaded, an older huggingface_hub), or no directory: nothing is read
        return
    for name in names:
        if not name.endswith(".json"):  # (the hub's own temporary files, never read)
            continue
        path = trees / name
        try:
            st = os.stat(path)  # (after links: where the hub's open() would read)
        except FileNotFoundError:
            continue  # a dangling link, or gone since: the hub finds no listing either
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read: {e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{path}: not a regular file (a cached file listing of the Hugging Face cache)")
        if st.st_size > _TREE_LIMIT:
            raise ModelLoadError(f"{path}: {st.st_size} bytes, more than the {_TREE_LIMIT} bytes a cached file "
                                 "listing of the Hugging Face cache may have")


def resolve_model(name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                  download: bool = True) -> Path:
    """The checkpoint directory for a path or a Hugging Face model id.

    An existing path wins. A string of the form "org/name" that is not a local
    directory is looked up in the local Hugging Face cache (`cache_dir`, default
    huggingface_hub's: HF_HUB_CACHE or HF_HOME/hub) and, when it is not there and
    `download` is true, downloaded with huggingface_hub. Anything else is returned
    as a Path (loading it reports what is wrong). Raises ModelLoadError naming the
    cache directory and the reason when the id is neither cached nor downloadable."""
    path = Path(name_or_path)
    if path.exists() or not isinstance(name_or_path, str) or not is_model_id(name_or_path):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    _check_ref(cache, name_or_path)
    _check_trees(cache, name_or_path)
    try:
        return Path(snapshot_download(name_or_path, cache_dir=cache, local_files_only=True,
                                      allow_patterns=list(CHECKPOINT_FILES)))
    except LocalEntryNotFoundError as exc:
        lacking = _incomplete(exc)
    where = f"{name_or_path!r} is not a local directory, and " + (
        f"not found in the local Hugging Face cache at {cache}" if lacking is None else
        f"its snapshot in the local Hugging Face cache at {cache} is incomplete ({lacking}: an interrupted download?)")
    if not download:
        raise ModelLoadError(f"{where} (downloading is off)")
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{where}, and downloading failed: HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(name_or_path, cache_dir=cache, allow_patterns=list(CHECKPOINT_FILES)))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all reported the same way
        raise ModelLoadError(f"{where}, and downloading failed: {_reason(exc)}") from exc
