"""The names a registry folder is made of (the layout `registry` documents), in a module of their own so
that the listing, `gc` and the registry itself share them without importing one another."""

ALIASES_DIR = "aliases"
LEGACY_ALIASES_FILE = "aliases.json"  # format of registries written before one file per alias
RETIRED_FILE = "retired.json"
STAGING = ".staging"
STATE = ".state"  # service state kept with the registry (schedules, build history)
CLAIM_FILE = "claim.json"  # object stores: written exclusively by the publisher that takes the number
