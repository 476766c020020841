"""Prometheus metrics of serving: latency, tokens, queue and load failures, per deployment."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    """On a registry of their own, so several servers in one process (tests) never share counters."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
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
        self.memory = Gauge("scratchllm_deployment_memory_bytes", "estimated memory a deployment holds, where it "
                            "is served", ["deployment", "device", "dtype"], registry=self.registry)
        self.load_failures = Counter("scratchllm_deployment_load_failures", "checkpoints that failed to load",
                                     ["deployment"], registry=self.registry)
