"""The `inspect` HTML report built from small shards: content, embedding, escaping, robustness."""

import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.random_shards import write_random_shards
from pipeline.report import build_report
from pipeline.report.build import rejected_from_manifest
from pipeline.report.collect import entropy_lower_bound, scan_shards
from pmu import shards
from pmu.io import write_json_atomic


def _cards(page: str) -> dict[str, str]:
    """sample id -> the HTML of its card."""
    parts = page.split('<article class="card"')[1:]
    return {
        re.search(r'data-sample-id="([^"]*)"', p).group(1): p.split("</article>")[0] for p in parts
    }


def _all_samples(shard_dir):
    return {
        s["meta"]["id"]: s
        for path in shards.shard_paths(shard_dir)
        for s in map(shards.decode_sample, shards.iter_raw_samples(path))
    }


def _jpeg(colour=(200, 40, 40), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_cards_show_the_known_samples_labels_with_probabilities(synthetic_shards, tmp_path):
    out = tmp_path / "reports" / "labels.html"
    summary = build_report(synthetic_shards, out, samples=6, seed=0, progress=False)
    page = out.read_text(encoding="utf-8")
    cards = _cards(page)
    assert page.count('<article class="card"') == 6 == len(cards) == summary["sampled"]
    assert summary["samples"] == 16
    entity_names, relation_names = shards.read_vocabularies(synthetic_shards)
    truth = _all_samples(synthetic_shards)
    checked_objects = 0
    for sample_id, card in cards.items():
        sample = truth[sample_id]
        assert sample["caption"] in card
        assert f"itm={sample['meta']['itm']}" in card
        for o in range(sample["ent_idx"].shape[0]):
            for idx, prob in list(zip(sample["ent_idx"][o], sample["ent_prob"][o], strict=True))[
                :5
            ]:
                assert f'{entity_names[idx]}</td><td class="num-cell">{prob:.3f}</td>' in card
            checked_objects += 1
        for idx, prob in list(zip(sample["rel_idx"], sample["rel_prob"], strict=True))[:5]:
            assert f'{relation_names[idx]}</td><td class="num-cell">{prob:.3f}</td>' in card
        assert card.count('class="crop"') == len(sample["meta"]["boxes"])
    assert checked_objects > 0
    # label sharpness: the stored top-1 masses (exact), and what a hard label drops
    top1 = [float(s["ent_prob"][o, 0]) for s in truth.values() for o in range(len(s["ent_prob"]))]
    assert summary["mean_top1_mass_ent"] == round(sum(top1) / len(top1), 4)
    assert summary["mean_mass_beyond_top1_ent"] == round(1 - sum(top1) / len(top1), 4)
    assert "mean mass beyond the top-1" in page


def test_every_image_is_embedded_and_nothing_is_external(synthetic_shards, tmp_path):
    out = tmp_path / "labels.html"
    summary = build_report(synthetic_shards, out, samples=100, seed=0, progress=False)
    page = out.read_text(encoding="utf-8")
    truth = _all_samples(synthetic_shards)
    n_boxes = sum(len(s["meta"]["boxes"]) for s in truth.values())
    assert page.count('<article class="card"') == len(truth) == summary["sampled"] == 16
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    # one annotated picture per sample, one crop per box, one histogram panel
    assert len(srcs) == len(truth) + n_boxes + 1
    assert all(re.fullmatch(r"data:image/(jpeg|png);base64,[A-Za-z0-9+/=]+", s) for s in srcs)
    for decoded in (
        Image.open(io.BytesIO(__import__("base64").b64decode(s.split(",")[1]))) for s in srcs
    ):
        decoded.load()  # every embedded picture is a real, decodable image
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "Content-Security-Policy" in page
    assert summary["objects"] == n_boxes
    no_det = sum(1 for s in truth.values() if not s["meta"]["boxes"])
    assert summary["images_without_detections"] == no_det
    assert f"Images without detections ({no_det} listed)" in page


def test_same_seed_gives_identical_bytes_and_another_seed_other_samples(synthetic_shards, tmp_path):
    a, b, c = (tmp_path / f"{n}.html" for n in "abc")
    build_report(synthetic_shards, a, samples=5, seed=7, progress=False)
    build_report(synthetic_shards, b, samples=5, seed=7, progress=False)
    build_report(synthetic_shards, c, samples=5, seed=8, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert set(_cards(a.read_text())) != set(_cards(c.read_text()))


def test_reservoir_draws_from_every_shard_with_bounded_memory(tmp_path):
    shard_dir = write_random_shards(tmp_path / "s", n_samples=40, samples_per_shard=8)
    picked = set()
    for seed in range(12):
        _, reservoir = scan_shards(shard_dir, 4, seed, 20, 10, progress=False)
        assert len(reservoir) == 4
        assert [i for i, _ in reservoir] == sorted(i for i, _ in reservoir)
        picked |= {i // 8 for i, _ in reservoir}
    assert picked == set(range(5))  # the last shards are as reachable as the first


def test_hostile_strings_are_escaped(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    evil = '<script>alert("x")</script>'
    sample = shards.LabelledSample(
        id='id"><img src=x onerror=alert(1)>',
        jpg=_jpeg(),
        caption=f"caption {evil} & more",
        meta={
            "source": "<b>src</b>",
            "itm": 1,
            "width": 64,
            "height": 48,
            "boxes": [[0.1, 0.1, 0.5, 0.6]],
            "box_classes": ["<i>cls</i>"],
            "box_confs": [0.9],
        },
        ent_idx=np.array([[1, 0]], np.int32),
        ent_prob=np.array([[0.7, 0.2]], np.float32),
        rel_idx=np.array([0], np.int32),
        rel_prob=np.array([0.9], np.float32),
    )
    shards.write_shard(shard_dir / "shard-000000.tar", [sample])
    write_json_atomic(
        shard_dir / "entities.json", {"entities": [{"name": "plain"}, {"name": f"ent {evil}"}]}
    )
    write_json_atomic(
        shard_dir / "relations.json", {"relations": [{"pid": "P1", "label": "<u>rel</u>"}]}
    )
    write_json_atomic(
        shard_dir / "manifest.json",
        {
            "counts": {"samples": 1},
            "preset": "<x>",
            "rejected": {"by_reason": {evil: 1}, "samples": [{"id": evil, "reason": evil}]},
        },
    )
    out = tmp_path / "r.html"
    build_report(shard_dir, out, samples=4, seed=0, progress=False)
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page and "onerror=alert(1)>" not in page
    for tag in ("<b>src", "<i>cls", "<u>rel", "<x>"):
        assert tag not in page
    assert "caption &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    assert (
        'ent &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</td><td class="num-cell">0.700'
        in page
    )
    assert "&lt;u&gt;rel&lt;/u&gt;" in page


def test_rejected_samples_by_reason_come_from_the_manifest(synthetic_shards, tmp_path):
    manifest_path = synthetic_shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["rejected"] = {
        "by_reason": {"image: truncated": 2, "caption: empty": 1},
        "samples": [
            {"id": "a", "reason": "image: truncated"},
            {"id": "b", "reason": "image: truncated"},
            {"id": "c", "reason": "caption: empty"},
        ],
    }
    manifest["counts"]["rejected"] = 3
    write_json_atomic(manifest_path, manifest)
    out = tmp_path / "r.html"
    summary = build_report(synthetic_shards, out, samples=2, seed=0, progress=False)
    page = out.read_text()
    assert summary["rejected"] == 3
    assert summary["rejected_by_reason"] == {"image: truncated": 2, "caption: empty": 1}
    assert '<td>image: truncated</td><td class="num-cell">2</td>' in page
    assert '<td>caption: empty</td><td class="num-cell">1</td>' in page
    # a bare list of {id, reason} is counted by reason too
    by_reason, items, total = rejected_from_manifest({"rejected": manifest["rejected"]["samples"]})
    assert (
        by_reason == {"image: truncated": 2, "caption: empty": 1} and total == 3 and len(items) == 3
    )


def test_bad_image_and_corrupt_shard_are_reported_and_the_run_goes_on(synthetic_shards, tmp_path):
    broken = shards.LabelledSample(
        id="broken-jpeg",
        jpg=b"\xff\xd8 not a jpeg",
        caption="cap",
        meta={
            "source": "t",
            "itm": 1,
            "width": 10,
            "height": 10,
            "boxes": [[0, 0, 1, 1]],
            "box_classes": ["x"],
            "box_confs": [0.5],
        },
        ent_idx=np.array([[0]], np.int32),
        ent_prob=np.array([[1.0]], np.float32),
        rel_idx=np.array([0], np.int32),
        rel_prob=np.array([1.0], np.float32),
    )
    shards.write_shard(synthetic_shards / "shard-000002.tar", [broken])
    (synthetic_shards / "shard-000003.tar").write_bytes(b"this is not a tar file" * 100)
    out = tmp_path / "r.html"
    summary = build_report(synthetic_shards, out, samples=100, seed=0, progress=False)
    page = out.read_text()
    assert summary["samples"] == 17 and summary["unreadable"] == 1
    assert "shard-000003.tar" in page
    card = _cards(page)["broken-jpeg"]
    assert "image cannot be decoded" in card and "entity0" in card
    assert any("manifest counts 16 samples" in w for w in summary["warnings"])


def test_entropy_lower_bound():
    assert entropy_lower_bound(np.full(8, 1 / 8)) == pytest.approx(math.log(8))
    assert entropy_lower_bound(np.array([1.0, 0.0])) == pytest.approx(0.0)
    # top-1 of 0.5 kept: the dropped 0.5 counts as one bin
    assert entropy_lower_bound(np.array([0.5])) == pytest.approx(math.log(2))


def test_cli_inspect_writes_the_report(synthetic_shards, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "reports" / "labels.html"
    result = CliRunner().invoke(
        app, ["inspect", str(synthetic_shards), "--out", str(out), "--samples", "3", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "3 of 16 samples shown" in result.output
    assert out.read_text().count('<article class="card"') == 3
    missing = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code != 0
