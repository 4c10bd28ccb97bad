"""The labeling chain on a small synthetic world, with adapted weights: the first test that fails
on wrong labels, not only on wrong shapes.

The detector is the one the project ships (pipeline/assets/world/detector.safetensors, made by
the command in docs/world.md on world seed 0); the teacher is adapted here, on this world's
adapt split. Labels are scored on the corpus images, which neither model saw.
"""

import pytest

from pipeline.detect import detect_objects
from pipeline.label import label_objects
from pipeline.models import ASSETS
from pipeline.nouns import mine_nouns
from pipeline.prepare import prepare
from pipeline.prompts import embed_prompts
from pipeline.readers.world import read_world
from pipeline.relations import fetch_relations
from pipeline.score import score_labels
from pipeline.settings import (
    AdaptTeacherSettings,
    DetectParams,
    DetectSettings,
    LabelParams,
    LabelSettings,
    TeacherParams,
)
from pipeline.teacher import adapt_teacher
from pipeline.world import build_world

pytestmark = pytest.mark.slow
DETECTOR = ASSETS / "world" / "detector.safetensors"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    world = root / "world"
    build_world(world, n=100, seed=1, n_adapt=240, mner=(2, 1, 1), mre=(2, 1, 1))
    for split in ("corpus", "adapt"):
        prepare(read_world(world / split), root / split, progress=False)
    pairs = root / "corpus" / "pairs.parquet"
    vocab = root / "entities.json", root / "relations.json"
    mine_nouns(pairs, vocab[0], progress=False)
    fetch_relations(vocab[1], from_file=world / "relations.tsv")
    boxes = root / "boxes.parquet"
    params = DetectParams(batch_size=32, imgsz=160, conf=0.25, top_k=6)
    detect = DetectSettings(pairs=str(pairs), out=str(boxes), preset="small",
                            detector=str(DETECTOR), params=params)  # fmt: skip
    detect_objects(detect, progress=False)
    teacher = root / "teacher.safetensors"
    adaptation = AdaptTeacherSettings(
        out=str(teacher),
        pairs=str(root / "adapt" / "pairs.parquet"),
        annotations=str(world / "adapt" / "truth.jsonl"),
        entities=str(vocab[0]),
        relations=str(vocab[1]),
        preset="tiny",
        entity_templates="1",
        relation_templates="A",
        # the entity objective only: this test checks q_ent (relations take far longer)
        params=TeacherParams(
            steps=200,
            batch_size=32,
            lr=2e-3,
            warmup_steps=10,
            holdout=0.0,
            weight_caption=0,
            weight_scene=0,
            weight_relation=0,
        ),
    )
    adapt_teacher(adaptation, progress=False)
    scores = {}
    for name, clip in (("adapted", teacher), ("random", None)):
        prompts = root / f"prompts-{name}.safetensors"
        embed_prompts(*vocab, prompts, "tiny", clip)
        shards = root / f"shards-{name}"
        labels = LabelSettings(
            pairs=str(pairs), boxes=str(boxes), prompts=str(prompts), entities=str(vocab[0]),
            relations=str(vocab[1]), out=str(shards), preset="tiny", rejected=None,
            clip=str(clip) if clip else None,
            params=LabelParams(samples_per_shard=64, num_workers=0),
        )  # fmt: skip
        label_objects(labels, progress=False)
        scores[name] = score_labels(shards, pairs, world / "corpus" / "truth.jsonl")
    return scores


def test_shipped_detector_finds_the_objects(chain):
    assert chain["adapted"]["detector"]["recall_iou50"] >= 0.8, chain["adapted"]["detector"]


def test_adapted_teacher_labels_the_crops(chain):
    adapted, random = chain["adapted"], chain["random"]
    assert adapted["true_classes_missing_from_vocabulary"] == []
    assert adapted["q_ent"]["matched_crops"] >= 100
    assert adapted["q_ent"]["top1"] >= 0.6, adapted["q_ent"]
    # the unadapted (random) teacher is near chance on the same crops
    assert random["q_ent"]["top1"] < 0.25, random["q_ent"]
    assert adapted["q_ent"]["top1"] > random["q_ent"]["top1"] + 0.4
