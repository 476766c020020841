"""Receiving a multipart upload straight into a file, in chunks, with a size limit.

Starlette's form parser spools files to a temporary file and knows no total limit; a multi-GB corpus
should go to its final disk at once and be refused as soon as it passes the limit.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException

from app.bodies import allow_body
from app.errors import APIError

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16


@dataclass
class ReceivedFile:
    filename: str | None = None  # as the client named it; never used as a path
    size: int = 0
    sha256: str = ""


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)

    @property
    def filename(self) -> str | None:
        return self.files["file"].filename

    @property
    def size(self) -> int:
        return self.files["file"].size

    @property
    def sha256(self) -> str:
        return self.files["file"].sha256


class _Receiver:
    """Multipart callbacks: each part named in `paths` goes to its file, other parts become text fields."""

    def __init__(self, paths: dict[str, Path], max_bytes: int):
        self.paths, self.max_bytes = paths, max_bytes
        self.upload = Upload()
        self.digests = {name: hashlib.sha256() for name in paths}
        self.open_files: dict[str, object] = {}
        self.file = None
        self.headers: dict[bytes, bytes] = {}
        self.header_field = b""
        self.header_value = b""
        self.part_name: str | None = None
        self.part_value = bytearray()
        self.parts = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data, "on_part_end": self.part_end,
                "on_header_field": self.header_field_data, "on_header_value": self.header_value_data,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_finished}

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise APIError(413, f"the form has more than {MAX_PARTS} parts")
        self.headers, self.part_name, self.part_value = {}, None, bytearray()

    def header_field_data(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def header_value_data(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part_name = options.get(b"name", b"").decode("utf-8", "replace")
        self.file = None
        if self.part_name in self.paths:
            if self.part_name in self.open_files:
                raise APIError(422, f"more than one {self.part_name!r} part", param=self.part_name)
            filename = options.get(b"filename")
            self.upload.files[self.part_name] = ReceivedFile(filename.decode("utf-8", "replace") if filename else None)
            self.file = open(self.paths[self.part_name], "wb")  # noqa: SIM115  (closed in finish)
            self.open_files[self.part_name] = self.file

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.file is not None:
            received = self.upload.files[self.part_name]
            received.size += len(chunk)
            if sum(f.size for f in self.upload.files.values()) > self.max_bytes:
                raise APIError(413, f"the upload exceeds the upload limit of {self.max_bytes:,} bytes",
                               param=self.part_name)
            self.digests[self.part_name].update(chunk)
            self.file.write(chunk)
        else:
            self.part_value += chunk
            if len(self.part_value) > MAX_FIELD_BYTES:
                raise APIError(413, f"form field {self.part_name!r} is too large", param=self.part_name)

    def part_end(self) -> None:
        if self.part_name and self.part_name not in self.paths:
            try:
                self.upload.fields[self.part_name] = self.part_value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise APIError(422, f"form field {self.part_name!r} is not UTF-8", param=self.part_name) from e

    def finish(self) -> Upload:
        for name, file in self.open_files.items():
            file.close()
            self.upload.files[name].sha256 = self.digests[name].hexdigest()
        return self.upload


async def receive_upload(request: Request, paths: dict[str, Path], max_bytes: int,
                         optional: frozenset[str] = frozenset()) -> Upload:
    """Stream the multipart request's file parts named in paths into those files; every one is required but
    those named in optional. On any error the files are removed."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(415, f"send multipart/form-data with the part(s) {', '.join(map(repr, paths))}")
    declared = request.headers.get("content-length")
    allowance = max_bytes + MAX_FIELD_BYTES * 8  # the files, and room for the form's other fields
    if declared is not None and declared.isdigit() and int(declared) > allowance:
        raise APIError(413, f"the request exceeds the upload limit of {max_bytes:,} bytes")
    allow_body(request.scope, allowance)
    receiver = _Receiver(paths, max_bytes)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())

    def discard() -> None:
        receiver.finish()
        for path in paths.values():
            path.unlink(missing_ok=True)

    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except (APIError, HTTPException):
        discard()
        raise
    except Exception as e:  # the multipart parser's own errors: a malformed body
        discard()
        raise APIError(400, f"malformed multipart body: {e}") from e
    upload = receiver.finish()
    missing = [name for name in paths if name not in upload.files and name not in optional]
    if missing:
        discard()
        raise APIError(422, f"the request has no {missing[0]!r} file part", param=missing[0])
    return upload
