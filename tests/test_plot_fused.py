"""Fig. 3 on the fused states: both panels for any fusion, on a small world."""

import json

import pytest

from pipeline.world import build_world
from trainer.plot_fused import main, mner_items, mre_items


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused-world")
    build_world(root / "w", n=8, seed=2, n_adapt=8, mner=(8, 8, 24), mre=(8, 8, 24))
    return root / "w"


def test_items_are_the_image_dependent_ones_with_their_key_object(world):
    meta = json.loads((world / "world.json").read_text())
    items = mner_items(world, 50)
    assert items and all(it.image.is_file() for it in items)
    for it in items:
        assert it.label in meta["mner_key_class"]
        x0, y0, x1, y1 = it.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert it.span[1] > it.span[0]
    rels = mre_items(world, 50)
    assert rels and all(it.label != "None" for it in rels)


def test_draws_both_panels_for_each_fusion(world, tmp_path):
    out, metrics = tmp_path / "fused.png", tmp_path / "fused.json"
    args = ["--world", str(world), "--model", "albef=tiny", "--out", str(out),
            "--metrics", str(metrics), "--preset", "tiny", "--n", "12"]  # fmt: skip
    assert main(args) == 0
    hvp = tmp_path / "hvp.png"
    args_hvp = ["--world", str(world), "--model", "hvp=tiny", "--fusion", "hvp",
                "--out", str(hvp), "--preset", "tiny", "--n", "12"]  # fmt: skip
    assert main(args_hvp) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and hvp.is_file()
    numbers = json.loads(metrics.read_text())["models"]["albef"]
    assert 0 <= numbers["entity_nearest_object_acc"] <= 1
    assert 0 <= numbers["image_nearest_prompt_acc"] <= 1
    assert numbers["n_entities"] >= 4 and numbers["n_images"] >= 4


def test_refuses_a_model_without_a_name(world, tmp_path, capsys):
    assert main(["--world", str(world), "--model", "tiny", "--out", str(tmp_path / "x.png")]) == 2
    assert "NAME=INIT" in capsys.readouterr().err
