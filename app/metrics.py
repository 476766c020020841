"""Prometheus metrics of this API process (`GET /metrics`)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per application, so several apps in one process (tests) never share counters."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("scratchllm_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.time_to_first_token = Histogram("scratchllm_time_to_first_token_seconds",
                                             "from admission to the first token", ["deployment"],
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("scratchllm_inter_token_latency_seconds", "between two tokens",
                                             ["deployment"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens_generated = Counter("scratchllm_generated_tokens", "tokens generated", ["deployment"],
                                        registry=self.registry)
        self.queue_depth = Gauge("scratchllm_queue_depth", "requests waiting for a slot", ["deployment"],
                                 registry=self.registry)
        self.running = Gauge("scratchllm_running_sequences", "sequences being decoded", ["deployment"],
                             registry=self.registry)
        self.load_failures = Counter("scratchllm_deployment_load_failures", "checkpoints that failed to load",
                                     ["deployment"], registry=self.registry)


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
