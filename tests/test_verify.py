"""pipeline verify: a good shard folder passes; each kind of tampering is reported."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import REPO_ROOT
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.verify import verify_shards

SHARD = "shard-000000.tar"


def _members(path):
    with tarfile.open(path) as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar]


def _rewrite(path, members, extra_infos=()):
    """Write a tar with the given (name, bytes) members in order, plus raw extra TarInfos."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra_infos:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _npy(array):
    buf = io.BytesIO()
    # allow_pickle on *save* only: one case writes a pickled object array that verify must refuse
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _first_with_objects(members):
    for name, data in members:
        if name.endswith(".json") and json.loads(data)["boxes"]:
            return name[: -len(".json")]
    raise AssertionError("no sample with objects")


def _edit_json(key, fn):
    def edit(members):
        out = []
        for name, data in members:
            if name == f"{key}.json":
                meta = json.loads(data)
                fn(meta)
                data = json.dumps(meta).encode()
            out.append((name, data))
        return out

    return edit


def _replace(key, suffix, data):
    def edit(members):
        return [(n, data if n == f"{key}.{suffix}" else d) for n, d in members]

    return edit


def _tamper(case, key, members):
    """(new members, expected report fragment) for one kind of damage."""
    ent_prob = np.load(io.BytesIO(dict(members)[f"{key}.ent_prob.npy"]))
    ent_idx = np.load(io.BytesIO(dict(members)[f"{key}.ent_idx.npy"]))
    if case == "prob_above_one":
        bad = ent_prob.copy()
        bad[0, 0] = 1.5
        return _replace(key, "ent_prob.npy", _npy(bad))(members), "probability outside [0,1]"
    if case == "sum_above_one":
        bad = np.full_like(ent_prob, 0.9)
        return _replace(key, "ent_prob.npy", _npy(bad))(members), "sum to"
    if case == "mass_mismatch":
        edit = _edit_json(key, lambda m: m.update(rel_mass=m["rel_mass"] - 0.3))
        return edit(members), "recorded mass"
    if case == "index_outside_vocab":
        bad = ent_idx.copy()
        bad[0, 0] = 20  # the synthetic entity vocabulary has 20 names
        return _replace(key, "ent_idx.npy", _npy(bad))(members), "outside the vocabulary of 20"
    if case == "box_outside_unit":
        edit = _edit_json(key, lambda m: m["boxes"][0].__setitem__(2, 1.2))
        return edit(members), "outside [0,1]"
    if case == "box_inverted":
        edit = _edit_json(key, lambda m: m["boxes"][0].__setitem__(0, m["boxes"][0][2] + 0.01))
        return edit(members), "x0>x1"
    if case == "object_count_mismatch":
        edit = _edit_json(key, lambda m: m["box_classes"].append("extra"))
        return edit(members), "box_classes for"
    if case == "ent_rows_mismatch":
        return _replace(key, "ent_idx.npy", _npy(ent_idx[:0]))(members), "ent arrays"
    if case == "missing_member":
        return [(n, d) for n, d in members if n != f"{key}.rel_prob.npy"], "missing members"
    if case == "pickled_array":
        data = _npy(np.array([{"a": 1}], dtype=object))
        return _replace(key, "rel_idx.npy", data)(members), "undecodable member"
    if case == "broken_jpg":
        return _replace(key, "jpg", b"\xff\xd8\xff\xe0 not really")(members), "jpg does not decode"
    raise AssertionError(case)


CASES = [
    "prob_above_one",
    "sum_above_one",
    "mass_mismatch",
    "index_outside_vocab",
    "box_outside_unit",
    "box_inverted",
    "object_count_mismatch",
    "ent_rows_mismatch",
    "missing_member",
    "pickled_array",
    "broken_jpg",
]


def test_good_shards_pass(synthetic_shards):
    report = verify_shards(synthetic_shards)
    assert report.ok, report.render()
    assert (report.shards, report.samples) == (2, 16) and report.render().endswith("OK")
    result = CliRunner().invoke(app, ["verify", str(synthetic_shards)])
    assert result.exit_code == 0 and "OK" in result.output


@pytest.mark.parametrize("case", CASES)
def test_each_kind_of_damage_is_reported(synthetic_shards, case):
    path = synthetic_shards / SHARD
    members = _members(path)
    key = _first_with_objects(members)
    new_members, fragment = _tamper(case, key, members)
    _rewrite(path, new_members)
    report = verify_shards(synthetic_shards)
    assert not report.ok
    assert any(fragment in p and key in p for p in report.problems), report.render()
    result = CliRunner().invoke(app, ["verify", str(synthetic_shards)])
    assert result.exit_code == 1 and fragment in result.output


def test_pickle_and_unsafe_members_are_reported(synthetic_shards):
    path = synthetic_shards / SHARD
    members = _members(path)
    evil = tarfile.TarInfo("../../evil.jpg")
    evil.size = 3
    pkl = tarfile.TarInfo("x.pkl")
    pkl.size = 3
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _rewrite(path, members, [(evil, b"abc"), (pkl, b"abc"), (link, None)])
    problems = "\n".join(verify_shards(synthetic_shards).problems)
    assert "'../../evil.jpg': unsafe path" in problems
    assert "'x.pkl': pickle member" in problems
    assert "'link.jpg': not a regular file" in problems


def test_folder_level_inconsistencies_are_reported(synthetic_shards):
    sizes = json.loads((synthetic_shards / "sizes.json").read_text())
    sizes["shard-000000.tar"] += 1
    sizes["shard-000009.tar"] = 3
    (synthetic_shards / "sizes.json").write_text(json.dumps(sizes))
    (synthetic_shards / "relations.json").write_text("{not json")
    problems = "\n".join(verify_shards(synthetic_shards).problems)
    assert "shard-000000.tar: 8 samples but sizes.json says 9" in problems
    assert "shard-000009.tar: listed in sizes.json but missing" in problems
    assert "relations.json: unreadable JSON" in problems
    assert "counts.samples=16 but sizes.json sums to 20" in problems


def test_non_adjacent_members_and_repeated_keys_are_reported(synthetic_shards):
    path = synthetic_shards / SHARD
    members = _members(path)
    # Move the first sample's caption to the end: its members are no longer adjacent.
    moved = [members[0], *members[2:], members[1]]
    _rewrite(path, moved)
    second = synthetic_shards / "shard-000001.tar"
    _rewrite(second, _members(second) + members[:7])  # a key of shard 0 again, in shard 1
    problems = "\n".join(verify_shards(synthetic_shards).problems)
    assert "are not adjacent" in problems
    assert "key repeated in another shard" in problems


def test_missing_folder_is_reported(tmp_path):
    report = verify_shards(tmp_path / "nope")
    assert not report.ok and "not a directory" in report.render()
    assert not verify_shards(tmp_path).ok  # empty folder: no sizes/manifest/vocabularies


def run_verify(folder) -> subprocess.CompletedProcess:
    """`python -m pipeline verify FOLDER` as a user runs it (a fresh interpreter)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "pipeline", "verify", str(folder)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("sizes", "shown"),
    [
        ({SHARD: "abc"}, f"entry '{SHARD}': \"abc\" is not a sample count"),
        ({SHARD: 1.5}, f"entry '{SHARD}': 1.5 is not a sample count"),
        ({SHARD: None}, f"entry '{SHARD}': null is not a sample count"),
        ({SHARD: [8]}, f"entry '{SHARD}': [8] is not a sample count"),
        ([8, 8], "expected an object of shard name -> sample count, got list"),
    ],
)
def test_a_sizes_table_without_whole_counts_is_one_line_and_exit_2(synthetic_shards, sizes, shown):
    (synthetic_shards / "sizes.json").write_text(json.dumps(sizes))
    proc = run_verify(synthetic_shards)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {synthetic_shards / 'sizes.json'}: {shown}"), lines
    problems = verify_shards(synthetic_shards).problems  # the library reports it, never raises
    assert any(p.startswith("sizes.json: ") for p in problems), problems
    if isinstance(sizes, dict):  # the shard is still listed: only its count is bad
        assert not any("not listed in sizes.json" in p for p in problems if SHARD in p), problems


def test_shards_without_samples_are_a_problem(synthetic_shards):
    for path in synthetic_shards.glob("shard-*.tar"):
        _rewrite(path, [])
    (synthetic_shards / "sizes.json").write_text(json.dumps({SHARD: 0, "shard-000001.tar": 0}))
    proc = run_verify(synthetic_shards)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "the shards hold no samples: nothing to train on" in proc.stdout
