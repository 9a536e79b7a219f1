"""Load levels: a closed-loop concurrency or an open-loop arrival rate, and their parsing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from inferd.loadtest.arrivals import Arrival


@dataclass(frozen=True)
class LoadLevel:
    """Closed loop: `concurrency` callers, each with one request outstanding at a time.
    Open loop: requests arrive at `rate` per second (constant gaps or Poisson), whatever the
    server's pace."""

    mode: Literal["closed", "open"]
    concurrency: int = 0
    rate: float = 0.0
    arrival: Arrival = "constant"

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"c={self.concurrency}"
        return f"{self.rate:g}/s {self.arrival}"

    @property
    def x(self) -> float:
        """The level's magnitude (concurrency or rate), for sorting and plotting."""
        return float(self.concurrency if self.mode == "closed" else self.rate)

    def as_dict(self) -> dict[str, object]:
        if self.mode == "closed":
            return {"mode": "closed", "concurrency": self.concurrency}
        return {"mode": "open", "rate": self.rate, "arrival": self.arrival}


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma-separated list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag} takes positive numbers, got {text!r}")
    return values


def closed_levels(text: str) -> list[LoadLevel]:
    """`1,4,16,64` -> closed-loop levels."""
    values = _numbers(text, "--concurrency")
    if any(v != int(v) for v in values):
        raise ValueError(f"--concurrency takes whole numbers, got {text!r}")
    return [LoadLevel("closed", concurrency=int(v)) for v in values]


def open_levels(text: str, arrival: Arrival) -> list[LoadLevel]:
    """`100,500,1000` (requests/s) -> open-loop levels."""
    return [LoadLevel("open", rate=v, arrival=arrival) for v in _numbers(text, "--rate")]
