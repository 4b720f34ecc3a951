"""vlcache counters as Prometheus gauges on SGLang's /metrics (with --enable-metrics).

Created in the scheduler process, like SGLang's own collectors; prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR, set up by SGLang) carries them to the HTTP server's /metrics.
"""

from __future__ import annotations

from typing import Any

from vlcache_sglang.stats import VLCacheStats


class VLCacheMetrics:
    def __init__(self) -> None:
        # Imported late: prometheus_client must see SGLang's PROMETHEUS_MULTIPROC_DIR first.
        from prometheus_client import Gauge

        self._gauges: dict[str, Any] = {
            name: Gauge(name=f"sglang:vlcache_{name}", documentation=f"vlcache {name.replace('_', ' ')}",
                        multiprocess_mode="mostrecent")
            for name in VLCacheStats().as_dict()
        }

    def publish(self, stats: VLCacheStats) -> None:
        for name, value in stats.as_dict().items():
            self._gauges[name].set(value)
