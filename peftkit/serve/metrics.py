"""The server's Prometheus metrics (``GET /metrics``), kept in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# time to first token and per-token latency buckets, seconds: CPU decoding runs from ms to seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "peftkit_requests",
            "Requests finished, by adapter and outcome",
            ["adapter", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "peftkit_prompt_tokens", "Prompt tokens prefilled", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "peftkit_generated_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.time_to_first_token = Histogram(
            "peftkit_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_token = Histogram(
            "peftkit_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_length = Gauge("peftkit_queue_length", "Requests waiting to join the batch", registry=r)
        self.batch_size = Gauge("peftkit_batch_size", "Rows in the running decode batch", registry=r)
        self.resident_adapters = Gauge(
            "peftkit_resident_adapters", "Adapters loaded in the model", registry=r
        )
        self.adapter_loads = Counter(
            "peftkit_adapter_loads", "Adapters read from disk (evicted ones reloaded included)", registry=r
        )
        self.decode_steps = Counter("peftkit_decode_steps", "Decode steps run", registry=r)
        self.classified_inputs = Counter(
            "peftkit_classified_inputs", "Texts classified (POST /v1/classify)", ["adapter"], registry=r
        )
        self.classify_latency = Histogram(
            "peftkit_classify_seconds",
            "From a classification request's arrival to its answer",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.classify_pass_rows = Histogram(
            "peftkit_classify_pass_rows",
            "Rows in one classification pass (texts of several requests and adapters together)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )

    def finished(
        self, adapter: str, outcome: str, arrived: float, first: float | None, end: float, tokens: int
    ):
        self.requests.labels(adapter, outcome).inc()
        self.generated_tokens.labels(adapter).inc(tokens)
        if first is not None:
            self.time_to_first_token.labels(adapter).observe(first - arrived)
            if tokens > 1:
                self.time_per_token.labels(adapter).observe((end - first) / (tokens - 1))

    def classified(self, adapter: str, inputs: int, tokens: int, seconds: float) -> None:
        self.requests.labels(adapter, "ok").inc()
        self.classified_inputs.labels(adapter).inc(inputs)
        self.prompt_tokens.labels(adapter).inc(tokens)
        self.classify_latency.labels(adapter).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
