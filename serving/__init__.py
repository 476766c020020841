"""Serving checkpoints: the continuous-batching engine on its own thread, the deployment manager that keeps
one engine per served checkpoint, and the asyncio client that admits requests and streams their events.
No web framework: the API's protocol adapters translate its shapes."""
