"""Host-side file I/O shared by every reader and writer.

Two promises hold everywhere in the project and live here so they are kept once:
bad input is one `InputError` line naming file:line:field, and output is written
so that a kill at any moment leaves either the old state or the new, never half.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """A user-facing error about input: the CLI prints `str(err)` as one line and exits 2."""


def where(path: str | os.PathLike, line: int | None = None, field: str | None = None) -> str:
    """`file:line: field` prefix used by every error message."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field is not None:
        out += f": field '{field}'"
    return out


def read_jsonl(
    path: str | os.PathLike,
    schema: Mapping[str, type | tuple[type, ...]] | None = None,
    *,
    unique: str | None = None,
    allow_empty: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` from a JSON-lines file, streaming.

    `schema` maps required fields to their types; `unique` names a field whose values must not
    repeat. Blank lines are skipped. Every problem raises `InputError` naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    seen: set[Any] = set()
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where(path, lineno)}: invalid UTF-8 at byte {e.start}") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{where(path, lineno)}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where(path, lineno)}: expected a JSON object, got {type(obj).__name__}")
            for name, typ in (schema or {}).items():
                if name not in obj:
                    raise InputError(f"{where(path, lineno, name)} is missing")
                if not isinstance(obj[name], typ) or (typ in (int, float) and isinstance(obj[name], bool)):
                    want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
                    raise InputError(
                        f"{where(path, lineno, name)} should be {want}, got {type(obj[name]).__name__}")
            if unique is not None:
                key = obj.get(unique)
                if key in seen:
                    raise InputError(f"{where(path, lineno, unique)}: duplicate value {key!r}")
                seen.add(key)
            count += 1
            yield lineno, obj
    if count == 0 and not allow_empty:
        raise InputError(f"{path}: file is empty")


def append_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Append whole records with one write + fsync, so a kill never leaves a partial line.

    A torn tail from an earlier crash (no trailing newline) is cut off first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(path)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_torn_tail(path: str | os.PathLike) -> None:
    """Truncate a jsonl file back to its last complete line (after a crash mid-write)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back for the last newline.
        pos = size - 1
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                f.truncate(pos - step + idx + 1)
                return
            pos -= step
        f.truncate(0)


def done_keys(path: str | os.PathLike, key: str) -> set[Any]:
    """Values of `key` in an output jsonl written by `append_jsonl` (for resuming)."""
    path = Path(path)
    if not path.exists():
        return set()
    drop_torn_tail(path)
    return {obj[key] for _, obj in read_jsonl(path, allow_empty=True) if key in obj}


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temp file + rename so readers never see a half file."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write a whole jsonl file through a temp file + rename."""
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                     for r in records).encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as a PNG atomically and release it.

    Figures made with the object API (`matplotlib.figure.Figure`) render through Agg without
    pyplot, so a library call never selects or switches the process's backend; a pyplot figure
    is also closed so pyplot stops holding it.
    """
    import io
    import sys

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    write_bytes_atomic(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when complete.

    A killed build leaves only `.<name>.partial`, which no reader takes for finished work and
    which the next build removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def file_checksum(path: str | os.PathLike, algo: str = "sha256") -> str:
    """Streaming checksum (used to key caches and to match indexes with their corpus)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """Per-user cache of derived files (de-quantised weights, compiled programs);
    `REASONRAG_JAX_CACHE` moves it."""
    return Path(os.environ.get("REASONRAG_JAX_CACHE", Path.home() / ".cache" / "reasonrag_jax"))
