"""Ports for tests that start several fake servers at --port + i."""

from __future__ import annotations

import random
import socket


def free_port_block(n: int) -> int:
    """A base port whose n ports from it are free now, below Linux's ephemeral range (32768 up): a run's
    own client connections take ephemeral ports and could land on base + i while an earlier fake server
    of the same run is still being measured (seen once in CI: 'Address already in use' on base + 1)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32768 - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports in 20000..32767")
