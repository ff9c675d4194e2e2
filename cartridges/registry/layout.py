"""The names a registry folder is made of, in a module of their own so that the registry, its listing
and `gc` share them without importing one another. The layout (readable without this code)::

    <root>/<name>/<version>/{manifest.json, adapter_config.json, adapter_model.safetensors}
    <root>/<name>/<version>/retired.json   a removed version: its number is never given out again
    <root>/<name>/aliases/<alias>.json     {"version": 3}, one file per alias
    <root>/.staging/<uuid>/                uploads in progress (never listed; `cartridges gc` clears old ones)
    <root>/.state/<file>.json              service state (the scheduler's schedules and history)

    <root>/<name>/<version>/claim.json     object stores: the publisher that took the number
"""

ALIASES_DIR = "aliases"
LEGACY_ALIASES_FILE = "aliases.json"  # format of registries written before one file per alias
RETIRED_FILE = "retired.json"
STAGING = ".staging"
STATE = ".state"  # service state kept with the registry (schedules, build history)
CLAIM_FILE = "claim.json"  # object stores: written exclusively by the publisher that takes the number
