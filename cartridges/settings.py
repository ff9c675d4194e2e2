"""The validation every config model shares (build configs, stage configs, CLI options).

`strict`: a YAML `true` is not 1 step and a string is not a number; `allow_inf_nan=False`: a
learning rate of `.inf` is refused when the config is read, not discovered as NaN after training.
"""

from pydantic import ConfigDict

STRICT_SETTINGS = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
