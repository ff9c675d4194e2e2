"""Functions that run in spawned worker processes: they import the registry alone (no torch), so workers start fast."""

from pathlib import Path

from cartridges.registry.store import Registry


def publish_one(args: tuple[str, str]) -> int:
    root, source = args
    return Registry(root).publish(Path(source), "legal").version


def set_aliases(args: tuple[str, int, int]) -> None:
    """Worker `worker` points `count` aliases of its own at versions 1-3 of legal."""
    root, worker, count = args
    reg = Registry(root)
    for i in range(count):
        reg.set_alias(f"legal@{1 + (worker + i) % 3}", f"w{worker}-{i}")
