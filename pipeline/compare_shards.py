"""Compare two shard folders member by member (their members.sha256), e.g. two machines' runs.

Only the small members.sha256 file of the other side is needed (copy it over, or pass its
folder). The report counts, per member suffix (jpg, json, ent_prob.npy, ...), how many members
differ, then lists the first few: which kind of member differs points at the stage or library
that decided the bytes (JPEG bytes: the image codec; probabilities: the float kernels).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pmu import shards
from pmu.errors import InputError


@dataclass
class MemberComparison:
    total: int = 0
    differ_by_suffix: Counter = field(default_factory=Counter)
    total_by_suffix: Counter = field(default_factory=Counter)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.differing or self.only_a or self.only_b)

    def render(self, limit: int = 20) -> str:
        if self.identical:
            return f"identical: all {self.total} members have the same sha256"
        lines = [f"{len(self.differing)} of {self.total} common members differ"]
        for suffix in sorted(self.total_by_suffix):
            n, of = self.differ_by_suffix[suffix], self.total_by_suffix[suffix]
            lines.append(f"  {suffix}: {n} of {of} differ")
        for what, names in (
            ("only in the first", self.only_a),
            ("only in the second", self.only_b),
        ):
            if names:
                lines.append(f"{len(names)} members {what}, e.g. {', '.join(names[:3])}")
        lines += [f"  differs: {name}" for name in self.differing[:limit]]
        return "\n".join(lines)


def _hashes(path: str | os.PathLike) -> dict[str, str]:
    p = Path(path)
    target = p / shards.MEMBERS_FILE if p.is_dir() else p
    if not target.is_file():
        raise InputError(
            f"{target} not found",
            "pass a shard folder labelled by this version, or its members.sha256 file",
        )
    try:
        return shards.read_member_hashes(target)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{target} is not a members.sha256 file ({exc})", "check the path"
        ) from None


def compare_members(a: str | os.PathLike, b: str | os.PathLike) -> MemberComparison:
    """Member-by-member comparison of two shard folders (or members.sha256 files)."""
    ha, hb = _hashes(a), _hashes(b)
    result = MemberComparison(
        only_a=sorted(ha.keys() - hb.keys()), only_b=sorted(hb.keys() - ha.keys())
    )
    for name in sorted(ha.keys() & hb.keys()):
        suffix = shards.split_member(name.split("/", 1)[-1])[1]
        result.total += 1
        result.total_by_suffix[suffix] += 1
        if ha[name] != hb[name]:
            result.differ_by_suffix[suffix] += 1
            result.differing.append(name)
    return result


def run_stage(first: str, second: str, limit: int) -> tuple[str, bool]:
    """compare-shards as the command runs it: (the report, whether they are identical)."""
    result = compare_members(first, second)
    return result.render(limit), result.identical
