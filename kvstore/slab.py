"""The file under the SSD tier (kvstore/ssd.py): one slab file, opened for O_DIRECT I/O where the
filesystem allows and locked against a second user.

`SlabFile.open` creates the directory if needed, opens the file with O_DIRECT (where the filesystem
refuses it at open, EINVAL, buffered instead) and takes an exclusive `flock` (so a second tier, in
this process or another, cannot use the same file). `pread` / `pwrite` are positional I/O of whole
buffers; if O_DIRECT is refused at the first I/O instead (some filesystems accept the flag at open),
the file drops it and retries buffered. `direct_io` says which is in use. Closing releases the lock.
The directory is created 0700 and the file 0600 (the service user's only); `directory_mac_key` is
the key of the entries' MAC kept beside them when the cluster has no secret.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from kvstore.tier import TierConfigError

logger = logging.getLogger(__name__)


class SlabFile:
    fd = -1

    def __init__(self, directory: str | Path, path: Path, direct: bool) -> None:
        """Open (create) `path` in `directory`; TierConfigError says why it cannot be used."""
        self.directory, self.path = Path(directory), path
        self.direct_io = False
        where = f"SSD cache directory {str(self.directory)!r}"
        if self.directory.exists() and not self.directory.is_dir():
            raise TierConfigError(f"{where} is not a directory")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise TierConfigError(f"{where} cannot be created: {e.strerror or e}") from e
        if self.directory.stat().st_mode & 0o077:
            logger.warning("%s is open to other users (mode %o): make it 0700, KV entries hold prompt content",
                           where, self.directory.stat().st_mode & 0o777)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    self.fd = os.open(path, flags | os.O_DIRECT, 0o600)
                    self.direct_io = True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    logger.info("%s does not support O_DIRECT; using buffered I/O", self.directory)
            if self.fd < 0:
                self.fd = os.open(path, flags, 0o600)
            os.fchmod(self.fd, 0o600)  # a file made by an older version or another umask: the service user's only
        except OSError as e:  # opening for writing is the write probe (a read-only mount fails it, even for root)
            raise TierConfigError(f"{where} is not writable: cannot open {path.name}: {e.strerror or e}") from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.close()
            raise TierConfigError(f"{path} is in use by another SSD tier (another process, "
                                  f"or a tier of this one not closed)") from e

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def _io(self, op: Callable[[int, memoryview, int], int], buf: memoryview, offset: int) -> int:
        if self.fd < 0:
            raise ValueError(f"SSD tier {self.path} is closed")
        try:
            return op(self.fd, buf, offset)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct_io:
                raise
        logger.warning("SSD tier %s: O_DIRECT I/O refused; falling back to buffered I/O", self.path)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct_io = False
        return op(self.fd, buf, offset)

    def pread(self, buf: memoryview, offset: int) -> int:
        """Read into `buf` from `offset`; the bytes read (fewer at the end of the file)."""
        return self._io(lambda fd, b, off: os.preadv(fd, [b], off), buf, offset)

    def pwrite(self, buf: memoryview, offset: int) -> None:
        """Write all of `buf` at `offset` (a short write raises EIO)."""
        n = self._io(os.pwrite, buf, offset)
        if n != len(buf):
            raise OSError(errno.EIO, f"short write to {self.path} ({n} of {len(buf)} bytes)")

    def close(self) -> None:
        """Close the file (which releases the lock); idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


MAC_KEY_FILE = "kvweave-ssd.key"
MAC_KEY_BYTES = 32


def directory_mac_key(directory: str | Path) -> bytes:
    """The MAC key kept in `directory` (made, 0600, by the first tier that needs it)."""
    path = Path(directory) / MAC_KEY_FILE
    if not path.exists():
        tmp = path.with_name(f".{MAC_KEY_FILE}.{secrets.token_hex(6)}")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(secrets.token_bytes(MAC_KEY_BYTES))
        try:
            os.link(tmp, path)  # atomic: a tier of another layout may race us to it
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != MAC_KEY_BYTES:
        raise TierConfigError(f"{path} is not an SSD MAC key ({len(key)} bytes, expected {MAC_KEY_BYTES})")
    return key
