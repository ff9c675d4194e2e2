"""The storage baseline from CacheGen's idea (arXiv 2310.07240): keep the whole corpus's KV (icl) on
disk instead of prefilling it per session, at fp32, fp16 and int8 (per-channel scales, dequantised
on load), and each given cartridge's prefix at the same precisions (cartridges/artifact/precision.py, what
`distill.precision` publishes). Reported: bytes on disk, load time (against prefill time for the
corpus KV), and the gold NLL of the read-back block paired against fp32. Used by `bench/methods.py`.
"""

import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cartridges.artifact.precision import PRECISIONS, decode, encode
from cartridges.stages.evaluation.contexts import Context, FixedContext, corpus_kv
from cartridges.stages.evaluation.evaluate import paired_gain, score_corpus


def save_kv(kv: torch.Tensor, path: Path, precision: str) -> None:
    save_file(encode("kv", kv, precision), str(path))


def load_kv(path: Path) -> torch.Tensor:
    """The fp32 KV, every byte read (safetensors maps the file; a dtype that already matches is not copied)."""
    return decode("kv", load_file(str(path))).clone()


def precision_rows(
    loaded, corpus, label: str, prefix: torch.Tensor, distractors: int, prefill_seconds=None
) -> list[dict]:
    """`prefix` stored at each precision and read back: bytes, load time, gold NLL paired against float32."""
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as folder:
        for precision in PRECISIONS:
            path = Path(folder) / f"{precision}.safetensors"
            save_kv(prefix, path, precision)
            started = time.perf_counter()
            read = load_kv(path)
            load_seconds = time.perf_counter() - started
            score = score_corpus(loaded, corpus, FixedContext(Context(read)), f"{label} {precision}", distractors)
            reference = reference or score
            gain, se = paired_gain(reference.per_question_nll, score.per_question_nll)
            rows.append(
                {
                    "corpus": corpus.id,
                    "stored": f"{label} {precision}",
                    "bytes_on_disk": path.stat().st_size,
                    "load_seconds": load_seconds,
                    "prefill_seconds": prefill_seconds,
                    "nll": score.nll,
                    "nll_vs_fp32": -gain,
                    "nll_vs_fp32_se": se,
                }
            )
    return rows


def storage_rows(
    loaded, corpus, distractors: int, cartridges: dict[str, torch.Tensor] | None = None, corpus_kv_too: bool = True
) -> list[dict]:
    """The corpus KV (against its prefill time; unless not `corpus_kv_too`) and each given cartridge
    prefix, at every precision."""
    rows = []
    if corpus_kv_too:
        started = time.perf_counter()
        kv = corpus_kv(loaded, corpus.text)
        rows = precision_rows(loaded, corpus, "icl KV", kv, distractors, prefill_seconds=time.perf_counter() - started)
    for label, prefix in (cartridges or {}).items():
        rows += precision_rows(loaded, corpus, label, prefix, distractors)
    return rows


def storage_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "Stored at fp32 / fp16 / int8 and read back (the corpus KV: CacheGen's idea, stored instead of prefilled):",
        "",
        "| corpus | stored | MB on disk | load s | prefill s | gold NLL | NLL vs fp32 ± paired SE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        prefill = "" if r["prefill_seconds"] is None else f"{r['prefill_seconds']:.1f}"
        lines.append(
            f"| {r['corpus']} | {r['stored']} | {r['bytes_on_disk'] / 1e6:.2f} | {r['load_seconds']:.3f} | "
            f"{prefill} | {r['nll']:.3f} | {r['nll_vs_fp32']:+.4f} ± {r['nll_vs_fp32_se']:.4f} |"
        )
    return lines


def load_times(loaded, corpus, repeats: int = 3) -> dict:
    """Prefill seconds of the corpus KV against reading it back at each precision (page cache dropped
    before each read where the OS allows), with the largest absolute error of the read-back values."""
    import os

    started = time.perf_counter()
    kv = corpus_kv(loaded, corpus.text)
    out = {"corpus": corpus.id, "tokens": kv.shape[0], "prefill_seconds": time.perf_counter() - started}
    with tempfile.TemporaryDirectory() as folder:
        for precision in PRECISIONS:
            path = Path(folder) / f"{precision}.safetensors"
            save_kv(kv, path, precision)
            seconds = []
            for _ in range(repeats):
                descriptor = os.open(path, os.O_RDONLY)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(descriptor)
                started = time.perf_counter()
                read = load_kv(path)
                seconds.append(time.perf_counter() - started)
            out[precision] = {
                "bytes": path.stat().st_size,
                "load_seconds": sorted(seconds),
                "max_abs_error": float((read - kv).abs().max()),
            }
    return out


def main() -> None:
    import argparse
    import json

    from cartridges.models import load_model
    from cartridges.qa import load_qa_files

    parser = argparse.ArgumentParser(description="Prefill vs load time of a corpus's KV at fp32/fp16/int8.")
    parser.add_argument("--corpus-id", action="append", required=True)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    for corpus in load_qa_files(None, args.corpus_id):
        print(json.dumps(load_times(loaded, corpus), indent=1))


if __name__ == "__main__":
    from cartridges.errors import run_script

    run_script(main)
