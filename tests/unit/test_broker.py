"""The embedded broker never shows a consumer a message that is still being written."""

import json
import uuid

import pytest
from kombu import Connection
from kombu.transport import filesystem

from core import broker
from core.queue import celery_config
from core.settings import Settings

MESSAGES = 50


def _queue_name() -> str:
    # kombu's filesystem transports share their queue bindings within a process: one queue per test
    return f"jobs-{uuid.uuid4().hex[:8]}"


def _connection(folder, transport: str) -> Connection:
    return Connection("filesystem://", transport=transport, transport_options={
        "data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(folder / "control"),
        "polling_interval": 0.001})


def _unreadable_while_sending(folder, transport: str, queue_name: str, monkeypatch) -> list[str]:
    """Send MESSAGES; each time one is being written, the message files a consumer would see and fail to read."""
    unreadable = []

    def look_while_writing(payload):  # runs while the transport writes a message: a consumer's view
        for path in folder.glob(f"*.{queue_name}.msg"):
            try:
                json.loads(path.read_bytes())
            except ValueError:
                unreadable.append(path.name)
        return json.dumps(payload)

    for module in (filesystem, broker):  # each transport's serializer, as its _put calls it
        monkeypatch.setattr(module, "dumps", look_while_writing)
    with _connection(folder, transport) as connection:
        queue = connection.SimpleQueue(queue_name)
        for i in range(MESSAGES):
            queue.put({"job": i})
    return unreadable


def test_kombus_own_transport_shows_consumers_empty_messages(tmp_path, monkeypatch):
    # why core.broker exists: a consumer polling at that moment takes the empty file, and the job is lost
    assert len(_unreadable_while_sending(tmp_path, "filesystem", _queue_name(), monkeypatch)) == MESSAGES


def test_the_embedded_broker_shows_only_whole_messages_and_delivers_each(tmp_path, monkeypatch):
    transport = celery_config(Settings(data_dir=tmp_path))["broker_transport"]
    queue_name = _queue_name()
    assert _unreadable_while_sending(tmp_path, transport, queue_name, monkeypatch) == []
    monkeypatch.undo()
    with _connection(tmp_path, transport) as connection:
        queue = connection.SimpleQueue(queue_name)
        received = []
        for _ in range(MESSAGES):
            message = queue.get(timeout=5)
            received.append(message.payload["job"])
            message.ack()
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.1)
    assert sorted(received) == list(range(MESSAGES))
