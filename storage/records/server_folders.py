"""The checks of a folder on the server before anything in it is read: where it may lie (``check_folder``:
inside the import folders, away from the store's own files), what it may hold (``check_tree``: no links,
no special files, no hard links, small metadata, a bounded walk), and :class:`Folder`, which reads one file
at a time without following any link. Every refusal is :class:`Refused`, whose message says the same words
(:data:`REFUSED`) whatever the reason."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from storage.records.files import inside

#: What every refusal of a path says, whatever the reason: a refusal tells nothing of what the server holds.
REFUSED = ("this path cannot be imported: it must be an OME-Zarr, zarr or N5 folder inside the import folders "
           "this server allows, with no links or special files")
#: The files zarr (and the N5 reader) read whole to learn what an array is: a few kilobytes when honest.
METADATA_FILES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata", "attributes.json"})
MAX_METADATA_BYTES = 1 << 20
#: Chunks so small that one slice needs more files than this are refused (a slice would take minutes).
MAX_CHUNKS_PER_SLICE = 1 << 16
#: A folder with more entries than this, or nested deeper, is refused before it is read (the walk alone of
#: an endless tree would keep a server busy, and no stack needs it).
MAX_TREE_ENTRIES = 1_000_000
MAX_TREE_DEPTH = 32


class Refused(ValueError):
    """A path (or a file under it) that may not be read. Its message is :data:`REFUSED` whatever the reason;
    ``reason`` is for the server's log and the tests, never for the user."""

    def __init__(self, reason: str):
        super().__init__(REFUSED)
        self.reason = reason


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # a stat opens nothing
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_folder(path: str | os.PathLike, roots: Sequence[Path], protected: Sequence[Path] = ()) -> Path:
    """The folder ``path`` names, resolved, if this server may read it: an absolute path to a real folder
    (not a link to one) that resolves inside one of ``roots`` and neither lies in nor holds a ``protected``
    path (the data directory, the database file and its folder). :class:`Refused` otherwise. Cheap (one
    ``lstat``, no walk): a linked dataset checks it on every read, since its folder may change."""
    if not roots:
        raise Refused("importing from the server is off (no import folders)")
    given = Path(str(path)).expanduser()
    if not given.is_absolute():
        raise Refused("not an absolute path")
    resolved = Path(os.path.realpath(given))
    if not any(inside(resolved, root) for root in roots):
        raise Refused("outside the import folders")
    for guarded in protected:
        guarded = Path(os.path.realpath(guarded))
        if inside(resolved, guarded) or inside(guarded, resolved):
            raise Refused(f"holds or lies in the protected {guarded}")
    try:
        st = os.lstat(given)
    except OSError:
        raise Refused("nothing there, or not readable") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused("not a folder (or a link to one)")
    return resolved


def check_tree(top: Path, protected: Sequence[Path] = ()) -> int:
    """Walk a folder before zarr or the N5 reader opens anything in it, following no link: every entry must
    be a folder or a plain file with one name (a hard link may be the database: reading it in the server
    drops SQLite's locks and loses later commits), never a symlink, a device, a FIFO or a socket, nor a
    ``protected`` file or folder by identity (a bind mount); metadata files must be small; at most
    :data:`MAX_TREE_ENTRIES` entries, :data:`MAX_TREE_DEPTH` folders deep. Returns how many files it holds;
    :class:`Refused` otherwise (nothing has been opened but folders)."""
    banned = {ident for ident in map(_identity, protected) if ident}
    pending, files, seen = [(str(top), 0)], 0, 0
    try:
        while pending:
            folder, depth = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    seen += 1
                    if seen > MAX_TREE_ENTRIES:
                        raise Refused(f"{top} holds more than {MAX_TREE_ENTRIES:,} files and folders")
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in banned:
                        raise Refused(f"{entry.path} is a protected file or folder")
                    if stat.S_ISDIR(st.st_mode):
                        if depth + 1 > MAX_TREE_DEPTH:
                            raise Refused(f"{entry.path} lies more than {MAX_TREE_DEPTH} folders deep")
                        pending.append((entry.path, depth + 1))
                    elif not stat.S_ISREG(st.st_mode):
                        raise Refused(f"{entry.path} is a link or a special file")
                    elif st.st_nlink != 1:
                        raise Refused(f"{entry.path} has {st.st_nlink} names (a hard link)")
                    elif entry.name in METADATA_FILES and st.st_size > MAX_METADATA_BYTES:
                        raise Refused(f"{entry.path}: metadata of {st.st_size:,} bytes")
                    else:
                        files += 1
    except OSError as exc:
        raise Refused(f"cannot walk {top}: {exc}") from None
    return files


_O_PATH = getattr(os, "O_PATH", 0)  # Linux: a descriptor that reads nothing, and whose closing drops no lock
_PROC_FD = _O_PATH and os.path.isdir("/proc/self/fd")


class Folder:
    """A folder on the server that is not ours, read one file at a time without following any link, even
    while someone writing in it swaps its files for links between two of our calls.

    Each read opens the folder afresh and checks it is still the folder that was checked (by identity:
    device and inode), then walks to the file one name at a time from that descriptor, never following a
    link (``O_NOFOLLOW`` at every step, not only the last). On Linux each step is opened with ``O_PATH``:
    that reads nothing, and closing it releases no lock. The file found is checked by its descriptor (a
    plain file with one name, not a ``banned`` file such as the database), and only then opened for reading
    through ``/proc/self/fd``: the very file that was checked, whatever now lies at its name. Why so
    careful: a server that opens its own database file, even only to read it, drops SQLite's locks on it
    when it closes that descriptor, and later commits are lost."""

    def __init__(self, path: str | os.PathLike, protected: Sequence[Path] = ()):
        self.top = os.path.realpath(path)
        self.banned = frozenset(ident for ident in map(_identity, protected) if ident)
        try:
            given = os.lstat(path)
        except OSError:
            raise Refused("nothing there, or not readable") from None
        if not stat.S_ISDIR(given.st_mode):
            raise Refused("not a folder (or a link to one)")
        self.identity = (given.st_dev, given.st_ino)
        os.close(self._open_top())  # the folder named is the one its resolved path leads to

    def _open_top(self) -> int:
        try:
            fd = os.open(self.top, (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise Refused(f"{self.top} is gone or became a link") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.identity:
            os.close(fd)
            raise Refused(f"{self.top} is no longer the folder that was checked")
        return fd

    def _step(self, name: str, folder: int, last: bool, key: str) -> tuple[int, os.stat_result] | None:
        """Open ``name`` in the folder ``folder`` without following a link: its descriptor (``O_PATH`` on
        Linux) and stat; None when it is not there (or, ``last``, when it is a folder). ``key``: for messages."""
        try:
            if _O_PATH:
                fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
                st = os.fstat(fd)
            else:  # no O_PATH: look before opening (a narrow race remains on such systems)
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                fd = -1
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            path = f"{name} (on the way to {key} in {self.top})"
            if (st.st_dev, st.st_ino) in self.banned:
                raise Refused(f"{path} is a protected file or folder")
            if stat.S_ISDIR(st.st_mode) and not last:
                if fd < 0:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
                return fd, st
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and not last):
                return None  # a folder where a file should be, or the other way round: no such key
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"{path} is a link or a special file")
            if st.st_nlink != 1:
                raise Refused(f"{path} has {st.st_nlink} names (a hard link)")
            if fd < 0:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=folder)
            return fd, st
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def read(self, key: str, limit: int, byte_range: tuple[int, int | None] | None = None) -> bytes | None:
        """The bytes of the file ``key`` (``a/b/c`` under the folder), or of ``byte_range`` (start, end;
        a negative start counts from the end) of it; None when it is not there. :class:`Refused` when any
        name on the way is a link, a special file, a hard link or a protected file; ValueError when the
        part to read is larger than ``limit``."""
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise Refused(f"{key!r} is not a name inside the folder")
        opened = [self._open_top()]
        try:
            for i, part in enumerate(parts):
                found = self._step(part, opened[-1], i == len(parts) - 1, key)
                if found is None:
                    return None
                opened.append(found[0])
            checked = found[1]
            flags = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
            if _PROC_FD:  # open for reading the very file checked, through its O_PATH descriptor
                opened.append(os.open(f"/proc/self/fd/{opened[-1]}", flags))
            elif _O_PATH:  # (no /proc: by its name again, compared below)
                opened.append(os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=opened[-2]))
            st = os.fstat(opened[-1])
            if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino) or not stat.S_ISREG(st.st_mode):
                raise Refused(f"{os.path.join(self.top, key)} changed while it was opened")
            start, end = 0, st.st_size
            if byte_range is not None:
                start, stop = byte_range
                start = max(0, st.st_size + start) if start < 0 else start
                end = st.st_size if stop is None else min(stop, st.st_size)
            if end - start > limit:
                raise ValueError(f"{key} is {end - start:,} bytes, more than the {limit:,} a chunk or its metadata "
                                 "may have")
            chunks, at = [], start
            while at < end and (chunk := os.pread(opened[-1], min(end - at, 1 << 24), at)):
                chunks.append(chunk)
                at += len(chunk)
            return b"".join(chunks)
        finally:
            for fd in reversed(opened):
                os.close(fd)

