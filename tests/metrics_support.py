"""Read this process's Prometheus instruments (tests run without PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    """The current value of one sample, 0 if it was never touched."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Deltas:
    """How much each of some samples grew since this object was made: ``Deltas(("name", {labels}), ...)()``."""

    def __init__(self, *samples: tuple[str, dict[str, str]]):
        self.samples = samples
        self.before = [sample(name, **labels) for name, labels in samples]

    def __call__(self) -> list[float]:
        now = [sample(name, **labels) for name, labels in self.samples]
        return [after - before for after, before in zip(now, self.before, strict=True)]
