"""vlcache counters as Prometheus gauges on SGLang's /metrics (with --enable-metrics).

Created in the scheduler process, like SGLang's own collectors; prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR, set up by SGLang) carries them to the HTTP server's /metrics. As
SGLang's own, one scheduler per data-parallel rank publishes (attention-TP rank 0: the other TP ranks
hold the same counts for their heads) and each sample carries its `dp_rank` label; a reader sums the
counts over ranks (`benchmarks/launch.parse_vlcache_gauges`).
"""

from __future__ import annotations

from typing import Any, Optional

from vlcache_sglang.stats import VLCacheStats


def publishing_dp_rank(tp_worker: Any) -> Optional[int]:
    """The DP rank a scheduler publishes for, or None where another rank of its group does (SGLang's
    gate for its own scheduler metrics: pipeline stage 0, attention-TP rank 0)."""
    ps = getattr(tp_worker, "ps", None)
    if ps is None:  # one GPU without SGLang's parallel state (tests)
        return 0
    if ps.pp_rank != 0 or ps.attn_tp_rank != 0:
        return None
    return ps.dp_rank or 0


class VLCacheMetrics:
    def __init__(self, dp_rank: int = 0) -> None:
        # Imported late: prometheus_client must see SGLang's PROMETHEUS_MULTIPROC_DIR first.
        from prometheus_client import Gauge

        self._gauges: dict[str, Any] = {
            name: Gauge(name=f"sglang:vlcache_{name}", documentation=f"vlcache {name.replace('_', ' ')}",
                        labelnames=("dp_rank",), multiprocess_mode="mostrecent")
            for name in VLCacheStats().as_dict()
        }
        self._dp_rank = str(dp_rank)

    def publish(self, stats: VLCacheStats) -> None:
        for name, value in stats.as_dict().items():
            self._gauges[name].labels(dp_rank=self._dp_rank).set(value)
