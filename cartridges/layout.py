"""The one prompt layout every method shares: a context block, then the identical chat.

The context block is whatever stands in for the corpus (nothing, corpus text, or a cartridge's
KV prefix); the chat after it is always the same tokens: a system instruction, the messages,
and the assistant header. Training and evaluation use this module so they cannot drift apart.
"""

from transformers import PreTrainedTokenizerBase

from cartridges.tokenizing import leading_token_ids

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer using what you know about the documents above."


def context_token_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of corpus text as it stands in the context block (with the tokenizer's BOS, if any);
    with `max_tokens`, only the beginning of the text that they need is tokenized."""
    if max_tokens is None:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    return leading_token_ids(tokenizer, text, max_tokens)


def chat_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
) -> list[int]:
    """The chat that follows the context block; a leading BOS is dropped since the block has one."""
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    ids = list(ids)
    if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]:
        ids = ids[1:]
    return ids
