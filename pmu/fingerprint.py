"""What a resumable run is: a fingerprint of everything that decides what it trains (its
settings, the contents of its data), saved with its state and compared on `--resume`.

A resume whose fingerprint differs is refused with one line naming what changed; settings
that do not change what is trained (output paths, logging, devices, the total step count of a
pretraining) are left out by the caller.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pmu.errors import InputError


def fingerprint(inputs: dict[str, Any]) -> dict[str, Any]:
    """{"sha256": digest of `inputs` (JSON, sorted keys), "inputs": inputs}."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "inputs": inputs}


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs (files: "content changed")."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            what = "content changed" if prefix == "files." else f"{a!r} -> {b!r}"
            out.append(f"{prefix}{key}: {what}")
    return out


def refuse_other_run(saved: dict[str, Any], current: dict[str, Any], state_dir: Path) -> None:
    """Raise InputError when the saved fingerprint is not the current one."""
    if saved["sha256"] == current["sha256"]:
        return
    diff = differences(saved["inputs"], current["inputs"]) or ["(fingerprint differs)"]
    raise InputError(
        f"--resume refused: the state in {state_dir} was written by a run with other data or "
        f"parameters: {'; '.join(diff)}",
        "rerun with the same settings, or without --resume to start over (or use another --out)",
    )
