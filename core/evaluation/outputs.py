"""What a sweep writes besides its report: JSON and JSONL files, and the run's metadata (command, machine,
versions, start date)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["append_jsonl", "read_jsonl", "run_metadata", "start_jsonl", "write_json"]


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def start_jsonl(out: Path | None, name: str) -> Path | None:
    """``out / name``, emptied for :func:`append_jsonl`, creating ``out``; None when ``out`` is None (write nothing)."""
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.unlink(missing_ok=True)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cpu_name() -> str:
    """The processor's model name (Linux: from /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_metadata(argv: Sequence[str] | None, model_name: str, backend: str, device) -> dict[str, Any]:
    import transformers

    return {
        "command": shlex.join(["kvsieve", *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": model_name,
        "backend": backend,
        "device": str(device),
        "machine": f"{platform.node()} {platform.machine()} {_cpu_name()}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
