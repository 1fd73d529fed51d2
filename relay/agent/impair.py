"""Network impairment for tests and demonstrations: `LOA_AGENT_IMPAIR="delay_ms=40,jitter_ms=20,
loss=0.01"` delays (and drops) RTP/RTCP datagrams on arrival, as a longer network path would."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Impairment:
    """A simulated longer network path for RTP/RTCP: extra delay, jitter and loss."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0

    @property
    def active(self) -> bool:
        return self.delay > 0 or self.jitter > 0 or self.loss > 0

    @classmethod
    def parse(cls, text: str | None) -> Impairment:
        """"delay_ms=40,jitter_ms=20,loss=0.01" (ValueError when malformed)."""
        imp = cls()
        for part in (text or "").split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep:
                raise ValueError(f"impairment needs key=value, got {part!r}")
            x = float(v)
            if not 0 <= x <= (1 if k.strip() == "loss" else 10_000):
                raise ValueError(f"impairment {k} out of range: {v}")
            if k.strip() == "delay_ms":
                imp.delay = x / 1000
            elif k.strip() == "jitter_ms":
                imp.jitter = x / 1000
            elif k.strip() == "loss":
                imp.loss = x
            else:
                raise ValueError(f"unknown impairment {k!r} (delay_ms, jitter_ms, loss)")
        return imp
