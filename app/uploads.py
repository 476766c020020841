"""Receiving a multipart upload straight into a file, in chunks, with a size limit.

Starlette's form parser spools files to a temporary file and knows no total limit; a multi-GB corpus
should go to its final disk at once and be refused as soon as it passes the limit.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import APIError

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # as the client named it; never used as a path
    size: int = 0
    sha256: str = ""


class _Receiver:
    """Multipart callbacks: the part named `file_field` goes to `path`, other parts become text fields."""

    def __init__(self, path: Path, file_field: str, max_bytes: int):
        self.path, self.file_field, self.max_bytes = path, file_field, max_bytes
        self.upload = Upload()
        self.digest = hashlib.sha256()
        self.file = None
        self.headers: dict[bytes, bytes] = {}
        self.header_field = b""
        self.header_value = b""
        self.part_name: str | None = None
        self.part_value = bytearray()
        self.error: APIError | None = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data, "on_part_end": self.part_end,
                "on_header_field": self.header_field_data, "on_header_value": self.header_value_data,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_finished}

    def part_begin(self) -> None:
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
        if self.part_name == self.file_field:
            if self.file is not None:
                raise APIError(422, f"more than one {self.file_field!r} part", param=self.file_field)
            filename = options.get(b"filename")
            self.upload.filename = filename.decode("utf-8", "replace") if filename else None
            self.file = open(self.path, "wb")  # noqa: SIM115  (closed in finish)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part_name == self.file_field:
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise APIError(413, f"the file is larger than the upload limit of {self.max_bytes:,} bytes",
                               param=self.file_field)
            self.digest.update(chunk)
            self.file.write(chunk)
        else:
            self.part_value += chunk
            if len(self.part_value) > MAX_FIELD_BYTES:
                raise APIError(413, f"form field {self.part_name!r} is too large", param=self.part_name)

    def part_end(self) -> None:
        if self.part_name and self.part_name != self.file_field:
            try:
                self.upload.fields[self.part_name] = self.part_value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise APIError(422, f"form field {self.part_name!r} is not UTF-8", param=self.part_name) from e

    def finish(self) -> Upload:
        if self.file is not None:
            self.file.close()
        self.upload.sha256 = self.digest.hexdigest()
        return self.upload


async def receive_upload(request: Request, path: Path, max_bytes: int, file_field: str = "file") -> Upload:
    """Stream the multipart request's `file_field` part into path; on any error path is removed."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(415, "send the corpus as multipart/form-data with a 'file' part")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MAX_FIELD_BYTES * 8:
        raise APIError(413, f"the request is larger than the upload limit of {max_bytes:,} bytes", param="file")
    receiver = _Receiver(path, file_field, max_bytes)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except APIError:
        receiver.finish()
        path.unlink(missing_ok=True)
        raise
    except Exception as e:  # the multipart parser's own errors: a malformed body
        receiver.finish()
        path.unlink(missing_ok=True)
        raise APIError(400, f"malformed multipart body: {e}") from e
    upload = receiver.finish()
    if receiver.file is None:
        raise APIError(422, f"the request has no {file_field!r} file part", param=file_field)
    return upload
