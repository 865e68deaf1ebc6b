"""Prometheus metrics of one server, in a registry of its own (two apps in one process never clash).

Names (all prefixed ``diffpo_``): ``requests_total{endpoint,status}``, ``request_latency_seconds
{endpoint}``, ``time_to_first_token_seconds{endpoint}``, ``queue_depth`` (requests waiting for a
slot), ``running_rows`` (rows in the decoding batch), ``batch_step_seconds``, ``batch_row_steps_total`` (rows
summed over steps: divided by ``batch_step_seconds_count`` it is the mean batch size), ``prompt_tokens_total``,
``completion_tokens_total``, ``nfe`` (forward passes per choice, by sampler), ``threshold`` (threshold
or gamma per choice, by sampler), ``cancelled_rows_total`` (rows dropped before finishing: client
gone, stop string, timeout) and ``model_ready``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
NFE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
THRESHOLD_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, 2.0, 5.0)

KNOWN_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (unknown paths share one label)."""
    if path in KNOWN_ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class ServerMetrics:
    """The collectors; the HTTP layer, the serving layer and the batcher each update their own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("diffpo_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("diffpo_request_latency_seconds", "time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("diffpo_time_to_first_token_seconds", "time from request to first determined text",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("diffpo_queue_depth", "requests waiting for a slot in the batch", registry=r)
        self.running_rows = Gauge("diffpo_running_rows", "rows in the decoding batch", registry=r)
        self.step_seconds = Histogram("diffpo_batch_step_seconds", "duration of one batched denoising step",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.row_steps = Counter("diffpo_batch_row_steps", "rows decoded, summed over denoising steps "
                                 "(/ batch_step_seconds_count = mean batch size)", registry=r)
        self.prompt_tokens = Counter("diffpo_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("diffpo_completion_tokens", "completion tokens of finished requests",
                                         registry=r)
        self.nfe = Histogram("diffpo_nfe", "forward passes per choice", ["sampler"], buckets=NFE_BUCKETS,
                             registry=r)
        self.threshold = Histogram("diffpo_threshold", "threshold (confidence) or gamma (eb) per choice",
                                   ["sampler"], buckets=THRESHOLD_BUCKETS, registry=r)
        self.cancelled_rows = Counter("diffpo_cancelled_rows", "rows dropped before they finished", registry=r)
        self.model_ready = Gauge("diffpo_model_ready", "1 once the model is loaded and serving", registry=r)

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
