"""Token sequences of different lengths as one padded batch (ids and attention mask)."""

import torch
from torch.nn.utils.rnn import pad_sequence


def pad_batch(sequences: list[list[int]], pad_token_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] token ids padded with `pad_token_id` on `side` ("left" for generation), and the
    attention mask (1 on tokens, 0 on padding)."""
    tensors = [torch.tensor(sequence, dtype=torch.long) for sequence in sequences]
    ids = pad_sequence(tensors, batch_first=True, padding_value=pad_token_id, padding_side=side)
    mask = pad_sequence([torch.ones_like(t) for t in tensors], batch_first=True, padding_value=0, padding_side=side)
    return ids, mask
