"""A directory as a tar stream, made while it is sent: no archive on disk, memory for one chunk at a time."""

import tarfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE  # 512: every member's header and data fill whole blocks
END_OF_ARCHIVE = 2 * BLOCK


def _members(directory: Path, root: str) -> list[tuple[Path, tarfile.TarInfo]]:
    members = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
        info = tarfile.TarInfo(f"{root}/{path.relative_to(directory).as_posix()}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        members.append((path, info))
    return members


def _padding(size: int) -> int:
    return -size % BLOCK


class TarStream:
    """The files below `directory`, under the folder `root`, as a POSIX tar archive of a size known at once."""

    def __init__(self, directory: Path, root: str):
        self.members = _members(directory, root)
        self.headers = [info.tobuf(tarfile.PAX_FORMAT) for _, info in self.members]

    @property
    def size(self) -> int:
        return sum(len(header) + info.size + _padding(info.size)
                   for header, (_, info) in zip(self.headers, self.members, strict=True)) + END_OF_ARCHIVE

    def __iter__(self) -> Iterator[bytes]:
        for header, (path, info) in zip(self.headers, self.members, strict=True):
            yield header
            with path.open("rb") as file:
                left = info.size
                while left and (chunk := file.read(min(CHUNK, left))):
                    left -= len(chunk)
                    yield chunk
            if left:  # the file shrank since it was listed: the archive would be corrupt
                raise OSError(f"{path.name} changed while it was sent")
            yield b"\0" * _padding(info.size)
        yield b"\0" * END_OF_ARCHIVE
