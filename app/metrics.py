"""Prometheus metrics of this API process (`GET /metrics`): serving's, and HTTP requests by route."""

from prometheus_client import Counter

from serving.metrics import ServingMetrics


class Metrics(ServingMetrics):
    def __init__(self):
        super().__init__()
        self.requests = Counter("scratchllm_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)


class CountRequests:
    """ASGI middleware counting requests by method, route and status.

    A plain ASGI wrapper rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware relays every
    chunk of a streamed body through a memory stream and an extra task, which on a busy 2-core server cost
    as much event-loop time per streamed token as the rest of the response.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app fails before it starts a response

        async def note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, note_status)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(scope["method"], route.path if route else "unmatched", status).inc()
