"""cartridges: turn a corpus into a small trained KV-cache prefix a model loads instead of the corpus.

The public Python API (README, "Python API"):

    import cartridges

    registry = cartridges.Registry(cartridges.default_registry_url())
    config = cartridges.load_build_config("default", ["distill.steps=64"])
    result = cartridges.build(Path("legal/"), "legal", config, registry)
    runtime = cartridges.load([result.ref], registry)
    runtime.generate([{"role": "user", "content": "How many days notice?"}])

Each name is imported on first use (PEP 562), so `import cartridges` and the CLI's start stay light: the
modules behind `build` and `load` import torch and transformers.
"""

import importlib

_PUBLIC = {
    "Registry": "cartridges.registry.store",
    "default_registry_url": "cartridges.home",
    "load": "cartridges.loading",  # -> CartridgeRuntime: generate(messages), logits(input_ids)
    "open_cartridge": "cartridges.loading",  # -> Cartridge: manifest and prefix, checked
    "CartridgeRuntime": "cartridges.runtime",
    "Manifest": "cartridges.artifact.manifest",
    "CartridgeError": "cartridges.errors",
    "build": "cartridges.pipeline.build",  # ingest -> synthesize -> distill -> evaluate -> publish
    "BuildResult": "cartridges.pipeline.build",
    "load_build_config": "cartridges.pipeline.build_config",
    "BuildConfig": "cartridges.stages.config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cartridges' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
