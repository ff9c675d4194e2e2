"""What every benchmark's results.json opens with: the command's arguments and the box it ran on.

Seconds measured on one CPU do not compare with another's: the same commit built the default cartridge
in 791 s on a 2-core AMD EPYC (AVX2) and in 445 s on a 2-core Intel Xeon (AVX-512, AMX) (BENCHMARKS.md,
"The default build on two 2-core boxes"), and results of earlier runs did not say which box made them."""

import argparse
import dataclasses
import os
import platform
from pathlib import Path
from typing import TypeVar

Settings = TypeVar("Settings")

# The instruction sets that decide CPU matmul speed here (torch picks its kernels by them).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "amx_tile")


def _first_cpu() -> dict[str, str]:
    """The fields /proc/cpuinfo gives the first CPU (empty where there is no such file)."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def machine() -> dict:
    """The CPU (model, cores this process may use, speed-relevant flags), torch, and the GPU if any."""
    import torch  # here: a client-only benchmark (serve_load) need not load it to import this module

    cpu = _first_cpu()
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def record_header(arguments: dict) -> dict:
    """The command's `arguments` (values as text, as earlier results have them) and `machine`."""
    return {"args": {k: str(v) for k, v in arguments.items()}, "machine": machine()}


def settings_of(args: argparse.Namespace, kind: type[Settings]) -> Settings:
    """The flags a script's library code reads, as the frozen dataclass `kind` that names them: below
    `main` no function takes the whole argparse namespace."""
    return kind(**{field.name: getattr(args, field.name) for field in dataclasses.fields(kind)})
