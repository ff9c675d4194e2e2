"""Speed of the server's batch decoder on the embedded model, without HTTP: `--rows` greedy generations
of `--tokens` tokens after a 256-token prefix, submitted together, timed `--repeat` times.

    python bench/decoder_speed.py --rows 16 --tokens 32 --repeat 3
"""

import argparse
import time

from cartridges.errors import run_script
from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import chat_token_ids
from cartridges.models import load_model
from cartridges.serving.batch_decoder import BatchDecoder
from cartridges.serving.generation import Generation, Sampling

TEXT = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model()
    prefix = kv_prefix_of_tokens(loaded.model, loaded.tokenizer(TEXT * 20)["input_ids"][:256])
    prompts = [
        chat_token_ids(loaded.tokenizer, [{"role": "user", "content": f"Question {i}: who were the Normans?"}])
        for i in range(args.rows)
    ]
    decoder = BatchDecoder(loaded.model, kv_shape(loaded.model.config), args.rows)
    try:
        for _ in range(args.repeat):
            started = time.perf_counter()
            generations = [decoder.submit(Generation(prefix, p, Sampling(args.tokens), frozenset())) for p in prompts]
            produced = sum(len(list(g.tokens())) for g in generations)
            seconds = time.perf_counter() - started
            print(
                f"{args.rows} rows: {produced} tokens in {seconds:.2f} s = {produced / seconds:.1f} tok/s", flush=True
            )
    finally:
        decoder.close()


if __name__ == "__main__":
    run_script(main)
