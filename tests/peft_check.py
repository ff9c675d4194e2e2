"""PEFT's own loading of an artifact beside our runtime's: the independent side of format tests."""

import torch
from peft import PeftModel

from cartridges.models import load_model
from cartridges.runtime import CartridgeRuntime

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def ours_and_peft_logits(loaded, cartridge) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of IDS after the cartridge in our runtime, and in `PeftModel.from_pretrained` of its folder."""
    ours = CartridgeRuntime(loaded, [cartridge]).logits(IDS)[0]
    peft_model = PeftModel.from_pretrained(load_model(str(loaded.path)).model, str(cartridge.path))
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits[0]
    return ours, theirs
