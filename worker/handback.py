"""The signal with which a shutting-down worker asks its pool processes to hand their jobs back.

Not SIGTERM (billiard terminates pool processes with it) and not SIGUSR1 (billiard's soft time limits).
"""

import signal

HAND_BACK_SIGNAL = signal.SIGUSR2
