"""verify compares every shard and sizes.json with the sha256 in manifest.json: content changes
that keep the contract are found; `--quick` skips the hashing (and says so)."""

import io
import json
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.verify import verify_shards

SHARD = "shard-000000.tar"


def _members(path):
    with tarfile.open(path) as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar]


def _rewrite(path, members):
    """The shard rewritten the way the pipeline writes tars (same headers), new contents."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _swap_jpg(members):
    jpgs = [i for i, (n, _) in enumerate(members) if n.endswith(".jpg")]
    a, b = jpgs[0], jpgs[1]
    out = list(members)
    out[a], out[b] = (members[a][0], members[b][1]), (members[b][0], members[a][1])
    return out


def _edit_caption(members):
    return [(n, b"an edited caption" if n.endswith(".txt") else d) for n, d in members]


def _move_mass(members):
    """Swap two probabilities of one object: sums, masses and ranges all stay valid."""
    out, done = [], False
    for name, data in members:
        if name.endswith(".ent_prob.npy") and not done:
            prob = np.load(io.BytesIO(data), allow_pickle=False)
            if prob.shape[0] and prob.shape[1] >= 2 and prob[0, 0] != prob[0, 1]:
                prob = prob.copy()
                prob[0, [0, 1]] = prob[0, [1, 0]]
                data, done = _npy(prob), True
        out.append((name, data))
    assert done
    return out


TAMPERING = {"swapped_jpg": _swap_jpg, "edited_caption": _edit_caption, "moved_mass": _move_mass}


def test_untouched_shards_pass_with_hashes(synthetic_shards):
    report = verify_shards(synthetic_shards)
    assert report.ok and not report.notes, report.render()
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "shard-000000.tar", "shard-000001.tar", "sizes.json", "members.sha256"
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_content_changes_that_keep_the_contract_are_found(synthetic_shards, case):
    path = synthetic_shards / SHARD
    _rewrite(path, TAMPERING[case](_members(path)))
    quick = verify_shards(synthetic_shards, check_hashes=False)
    assert quick.ok, quick.render()  # the contract alone cannot see this change
    assert quick.notes == ["file hashes not checked (--quick)"]
    report = verify_shards(synthetic_shards)
    assert report.problems == [
        f"{SHARD}: content changed after labeling: sha256 differs from manifest.json"
    ]
    result = CliRunner().invoke(app, ["verify", str(synthetic_shards)])
    assert result.exit_code == 1 and "sha256 differs" in result.output
    result = CliRunner().invoke(app, ["verify", str(synthetic_shards), "--quick"])
    assert result.exit_code == 0 and "note: file hashes not checked (--quick)" in result.output


def test_sizes_json_and_extra_or_old_manifests(synthetic_shards):
    sizes = synthetic_shards / "sizes.json"
    sizes.write_text(sizes.read_text().replace("\n", "\n "))  # same JSON, other bytes
    problems = verify_shards(synthetic_shards).problems
    assert any(p.startswith("sizes.json: ") and "bytes but manifest.json" in p for p in problems)

    manifest_path = synthetic_shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("files")
    manifest_path.write_text(json.dumps(manifest))
    report = verify_shards(synthetic_shards)
    assert report.ok and "records no file hashes" in report.notes[0]  # older manifests: a note


def test_member_hashes_compare_two_runs_member_by_member(tmp_path):
    """members.sha256 lists every tar member; compare-shards says which kinds of member differ
    between two runs (e.g. two machines'), and reads only those files."""
    from pipeline.random_shards import write_random_shards

    a = write_random_shards(tmp_path / "a", seed=0)
    b = write_random_shards(tmp_path / "b", seed=0)
    lines = (a / "members.sha256").read_text().splitlines()
    assert len(lines) == 16 * 7 and lines[0].endswith(
        "  shard-000000.tar/" + _members(a / SHARD)[0][0]
    )
    runner = CliRunner()
    same = runner.invoke(app, ["compare-shards", str(a), str(b / "members.sha256")])
    assert same.exit_code == 0 and same.output.startswith("identical: all 112 members"), same.output

    path = b / SHARD
    _rewrite(path, _move_mass(_members(path)))
    (b / "members.sha256").unlink()
    from pmu import shards

    shards.hash_shards(b, ["shard-000000.tar", "shard-000001.tar"])
    diff = runner.invoke(app, ["compare-shards", str(a), str(b)])
    assert diff.exit_code == 1, diff.output
    assert "1 of 112 common members differ" in diff.output
    assert "ent_prob.npy: 1 of 16 differ" in diff.output and "jpg: 0 of 16 differ" in diff.output

    missing = runner.invoke(app, ["compare-shards", str(a), str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "members.sha256" in missing.output


def test_an_edited_member_list_is_found_by_verify(synthetic_shards):
    hashes = synthetic_shards / "members.sha256"
    hashes.write_text(hashes.read_text().replace("0", "1", 1))
    report = verify_shards(synthetic_shards)
    assert not report.ok and "members.sha256" in report.render()
