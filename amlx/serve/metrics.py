"""Prometheus metrics of one server (a CollectorRegistry per app, so apps never share counters).

Counters and the time-to-first-token histogram are updated by the request code;
running/waiting requests, the engine's own token and step counters, MLX memory and
the KV block pool's counters (`amlx_kv_cache{field=...}`: blocks used, cached, free,
allocated, prefix-cache hits and misses, preemptions) are read from `model.stats()`
when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Real

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import amlx

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    """Gauges read from the model at scrape time."""

    def __init__(self, model: "amlx.Model"):
        self._model = model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._model.stats()
        yield GaugeMetricFamily("amlx_requests_running", "Requests in the running batch (prefilling included)",
                                value=stats["active_requests"])
        yield GaugeMetricFamily("amlx_requests_waiting", "Requests waiting for a batch slot",
                                value=stats["waiting_requests"])
        # (the engine's count: every token generated, those no client read included; the
        # request code's amlx_generation_tokens counts the tokens handed to clients)
        yield CounterMetricFamily("amlx_engine_generated_tokens", "Tokens the engine generated for any request "
                                  "(those of generations whose client left or that failed, and the warm-up requests "
                                  "at load, included)", value=stats["tokens_generated"])
        yield CounterMetricFamily("amlx_engine_decode_steps", "Batched decode steps the engine ran",
                                  value=stats["decode_steps"])
        memory = GaugeMetricFamily("amlx_mlx_memory_bytes", "MLX memory (active: weights, the KV block pool and "
                                   "temporaries)", labels=["kind"])
        for kind, value in stats["memory"].items():
            memory.add_metric([kind], value)
        yield memory
        kv = stats.get("kv_cache")
        if isinstance(kv, dict):
            family = GaugeMetricFamily("amlx_kv_cache", "KV cache counters from model.stats()", labels=["field"])
            for field, value in kv.items():
                if isinstance(value, Real):
                    family.add_metric([field], float(value))
            yield family
        spec = stats.get("speculative")  # a model loaded with `draft`
        if isinstance(spec, dict):
            yield CounterMetricFamily("amlx_speculative_drafted_tokens", "Tokens drafted for speculative decoding",
                                      value=spec["drafted_tokens"])
            yield CounterMetricFamily("amlx_speculative_accepted_tokens", "Drafted tokens the model accepted",
                                      value=spec["accepted_tokens"])


class Metrics:
    def __init__(self, model: "amlx.Model"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("amlx_requests", "Generation requests received, by endpoint", ["endpoint"],
                                registry=r)
        self.errors = Counter("amlx_request_errors", "Requests answered with an error, by HTTP status", ["status"],
                              registry=r)
        # A streamed request that fails after its 200 gets its error as an SSE event: no status
        # is answered, so amlx_request_errors_total never saw it, and a failing streamed
        # generation showed in no metric at all (nor finished, nor cancelled).
        self.stream_errors = Counter("amlx_stream_errors", "Streamed requests that failed after their 200 was sent "
                                     "(answered with an SSE error event), by the HTTP status the error has",
                                     ["status"], registry=r)
        self.cancelled = Counter("amlx_requests_cancelled", "Generations cancelled because the client went away; "
                                 "phase 'prefill' = before the first token (queued or prefilling)", ["phase"],
                                 registry=r)
        self.finished = Counter("amlx_generations_finished", "Generations that ran to their end, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("amlx_requests_rejected", "Requests refused with 429 (queue full)", registry=r)
        self.prompt_tokens = Counter("amlx_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("amlx_generation_tokens", "Tokens handed to clients (a generation that "
                                         "fails or whose client leaves counts those handed before; "
                                         "amlx_engine_generated_tokens counts every token)", registry=r)
        self.ttft = Histogram("amlx_time_to_first_token_seconds", "Time from a request's arrival to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        r.register(_EngineCollector(model))

    def render(self) -> bytes:
        return generate_latest(self.registry)
