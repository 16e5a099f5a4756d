"""Reading files that a user, another run or a download hands over (checkpoints, packed models, teacher weights,
reports and logs): regular files only (a FIFO would block forever, /dev/zero never ends), sizes bounded before
anything is decoded, tensors through torch.load(weights_only=True) only, and every failure a ValueError (or
FileNotFoundError) that names the file. Imports nothing from candle_ext, so every layer may use it."""
from __future__ import annotations

import json
import os
import pickle
import re
import reprlib
import stat
import tempfile
import zipfile
from typing import Callable

import torch

MAX_JSON_BYTES = 256 << 20  # a jsonl log of a long run: ~100 bytes a step
MAX_RECORD_BYTES = 16 << 20  # a JSON report or record: kilobytes (per-class lists of 8,142 classes: ~200 KB)
MAX_LINE_BYTES = 1 << 20  # one line of a jsonl log or of a split file


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60


def short_repr(value, max_string: int = 60) -> str:
    """repr(value) for an error message, bounded in length and in work: a value read from a file may be a
    structure that shares its parts (YAML aliases, pickle memo), whose full repr would be exponentially long.
    max_string: the longest string shown whole (a file path in a configuration diff needs more than 60)."""
    if max_string == _SHORT.maxstring:
        return _SHORT.repr(value)
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = _SHORT.maxlevel, max_string, _SHORT.maxother
    return r.repr(value)


def plain_data(value, max_depth: int = 16, _depth: int = 0) -> bool:
    """Whether value is what JSON holds (None, bool, int, float, str; lists and str-keyed dicts of them, nested at
    most max_depth): a record read back from a checkpoint may hold tensors or odd keys instead."""
    if _depth > max_depth:
        return False
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (list, tuple):
        return all(plain_data(v, max_depth, _depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and plain_data(v, max_depth, _depth + 1) for k, v in value.items())
    return False


def regular_file(path, what: str) -> None:
    """`path` exists and is a regular file (symlinks followed): a FIFO, a device or a folder is refused."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise ValueError(f"{what} {path} is {kind}")


def check_zip_records(path, what: str) -> None:
    """torch.save writes its records stored, not compressed: a compressed record (a 3 MB file that inflates to
    3 GiB before torch can refuse it) or one whose size disagrees with its stored size is refused first."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy (pre-1.6) format: a plain pickle stream, no larger than the file
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    raise ValueError(f"{what} {path} is not a torch.save file: its record {info.filename!r} is "
                                     f"compressed ({info.compress_size} bytes for {info.file_size})")
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None


def torch_load(path, what: str, map_location="cpu"):
    """torch.load(weights_only=True) of a regular file with stored records: tensors and plain containers only.
    Anything else (another format, truncated, compressed records, naming other objects) is a ValueError naming
    the file; torch's own advice to pass weights_only=False, i.e. to run what the file names, is not passed on."""
    regular_file(path, what)
    check_zip_records(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        raise ValueError(f"{what} {path} is not a file of tensors and plain containers (refused by "
                         f"torch.load(weights_only=True){': ' + found.group(1).strip() if found else ''})"
                         ) from None
    except (RuntimeError, EOFError, ValueError, OSError, MemoryError, RecursionError) as exc:
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{what} {path} cannot be read: {first}") from exc


def read_text(path, what: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of a regular file of at most max_bytes."""
    regular_file(path, what)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{what} {path} has {size} bytes, more than the {max_bytes} such a file may have")
    try:
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def read_json(path, what: str, max_bytes: int = MAX_RECORD_BYTES):
    """The JSON value of a regular UTF-8 file of at most max_bytes; a parse error names the file."""
    text = read_text(path, what, max_bytes)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too-long integers, deep nesting
        raise ValueError(f"{what} {path} is not valid JSON: {str(exc)[:200]}") from None


def read_json_lines(path, what: str, max_bytes: int = MAX_JSON_BYTES, max_line: int = MAX_LINE_BYTES):
    """The JSON objects of a jsonl file, one per non-empty line; a line longer than max_line, one that is not a
    JSON object, or a file over max_bytes is a ValueError naming the file and the line."""
    rows = []
    for i, line in enumerate(read_text(path, what, max_bytes).splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > max_line:
            raise ValueError(f"{what} {path}, line {i}: longer than {max_line} characters")
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{what} {path}, line {i}: not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{what} {path}, line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


# ---- writing: what a run writes into its out folder (which a user may have been handed, links and all)

def write_atomic(path, write: Callable) -> None:
    """write(fh) fills a temporary file (binary) in path's folder, which is flushed to disk and then renamed onto
    path: a kill leaves the old file or the new one, never a torn one, and a symbolic link at path is replaced,
    never written through (a link planted in an out folder cannot make a run overwrite its target)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:  # an existing file keeps its mode, as open(path, "w") would; else the mode open() gives a new file
        old = os.lstat(path)
        mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else None
    except OSError:
        mode = None
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(str(path))[1])
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)  # not mkstemp's 0600: runs are shared
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    """text (UTF-8) into path, atomically (write_atomic)."""
    data = text.encode("utf-8")
    write_atomic(path, lambda fh: fh.write(data))


def open_log(path, mode: str, what: str):
    """A text log opened for "a"ppending or "w"riting, or "r"eading, without following a symbolic link at path
    (ValueError naming it): logs grow line by line, so they cannot be written atomically."""
    try:
        return open(path, mode, opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW, 0o666))
    except OSError:
        if os.path.islink(path):
            raise ValueError(f"{what} {path} is a symbolic link; a run writes its logs only into regular files "
                             "(remove the link, or use another out folder)") from None
        raise


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only read by setting, racing other threads)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
