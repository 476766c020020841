import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.tar_stream import TarStream


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 511, 512, 513, 1024 * 1024 + 7]), min_size=1, max_size=4))
def test_the_stream_is_a_tar_archive_of_the_directory_and_of_the_size_it_announces(tmp_path_factory, sizes):
    directory = tmp_path_factory.mktemp("ckpt")
    (directory / "nested").mkdir()
    files = {}
    for i, size in enumerate(sizes):
        name = f"nested/f{i}.bin" if i % 2 else f"f{i}.bin"
        files[f"ckpt_1/{name}"] = bytes((i + j) % 251 for j in range(size))
        (directory / name).write_bytes(files[f"ckpt_1/{name}"])
    stream = TarStream(directory, "ckpt_1")
    data = b"".join(stream)
    assert len(data) == stream.size
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == files


def test_a_file_that_shrinks_while_it_is_sent_fails_the_stream(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 4096)
    stream = iter(TarStream(tmp_path, "ckpt_1"))
    next(stream)  # the header, with the size listed
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(OSError, match="changed while it was sent"):
        b"".join(stream)
