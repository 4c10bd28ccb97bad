"""Typer app: one thin command per stage. Heavy imports stay inside the commands.

Expected failures raise `pmu.errors.InputError` (from the up-front checks in
`pipeline.checks` or from a stage); `PipelineGroup` prints them in one or two lines and exits 2.
`pipeline --debug` shows their traceback instead; other exceptions are bugs and always do.
"""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperGroup

from pmu.errors import InputError

# `pipeline --help` lists the commands in the order they run; commands not named here follow
# in definition order.
COMMAND_ORDER = (
    "synth-world",
    "prepare",
    "mine-nouns",
    "fetch-relations",
    "train-detector",
    "detect-objects",
    "adapt-teacher",
    "embed-prompts",
    "label-objects",
    "verify",
    "score-labels",
    "inspect",
    "presets",
)


class PipelineGroup(TyperGroup):
    """The `pipeline` command group: pipeline-ordered help, and UserErrors as short messages."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))

    def format_commands(self, ctx: typer.Context, formatter) -> None:
        """Each command with its whole first sentence (wrapped, never cut off with `...`)."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=300)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            if ctx.params.get("debug"):
                raise
            typer.echo(exc.render(), err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="pipeline",
    cls=PipelineGroup,
    help="Prompt Me Up labeling pipeline (image-caption pairs -> soft-labelled shards).",
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help wraps long defaults instead of cutting them off; plain tracebacks.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"max_content_width": 100},
)


@app.callback()
def main(
    debug: bool = typer.Option(
        False,
        "--debug",
        envvar="PIPELINE_DEBUG",
        help="Show the full traceback of an expected error (bad input) too.",
    ),
) -> None:
    """Prompt Me Up labeling pipeline: image-caption pairs -> soft-labelled WebDataset shards.

    Every stage is also a DVC stage (see dvc.yaml); run them in the order listed.
    """
    from pmu.runtime import configure_process

    configure_process()  # PMU_REPRODUCIBLE=1: pin the CPU kernels before torch computes


@app.command("presets")
def presets_cmd() -> None:
    """List the model presets and what each component loads."""
    from pmu.presets import PRESETS

    for preset in PRESETS.values():
        typer.echo(f"{preset.name}: {preset.to_dict()}")


@app.command("inspect")
def inspect_cmd(
    shard_dir: str = typer.Argument(..., help="Folder with shard-*.tar, manifest.json, vocabs."),
    out: str = typer.Option("reports/labels.html", help="The self-contained HTML report to write."),
    samples: int = typer.Option(48, min=0, help="Samples shown as cards (seeded reservoir)."),
    seed: int = typer.Option(0, help="Seed of the sample choice."),
) -> None:
    """Write an HTML report of crops, soft labels and label statistics for judging by eye."""
    from pipeline import checks

    checks.readable_shard_folder(shard_dir)
    from pipeline.report import build_report

    summary = build_report(shard_dir, out, samples=samples, seed=seed)
    typer.echo(
        f"inspect: {summary['out']} ({summary['bytes'] / 1e6:.1f} MB): {summary['sampled']} of "
        f"{summary['samples']} samples shown, {summary['objects']} objects, "
        f"{summary['images_without_detections']} images without detections, "
        f"{summary['rejected']} rejected, {summary['unreadable']} unreadable"
    )
    typer.echo(
        f"  mean entropy q_ent {summary['mean_entropy_ent']} / q_rel {summary['mean_entropy_rel']} "
        f"nats; mean kept mass q_ent {summary['mean_kept_mass_ent']} / "
        f"q_rel {summary['mean_kept_mass_rel']}; mean top-1 mass q_ent "
        f"{summary['mean_top1_mass_ent']} / q_rel {summary['mean_top1_mass_rel']}"
    )
    for warning in summary["warnings"]:
        typer.echo(f"  warning: {warning}")


def _parse_params(spec: str | None) -> dict | None:
    """`--stage-params params.yaml` -> the dict recorded in the shard manifest."""
    if not spec:
        return None
    import yaml

    from pmu.errors import require_file

    path = require_file(spec, "--stage-params file", "pass params.yaml, or leave it out")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not readable YAML ({exc})", "fix the file") from exc


ENGINE_OPTION = typer.Option("local", help="local (this process) | ray (Ray Data actor pool).")
RAY_ADDRESS_OPTION = typer.Option(
    "", help="Ray cluster to use (default: $RAY_ADDRESS, else a Ray started on this machine)."
)
RAY_ACTORS_OPTION = typer.Option(0, min=0, help="Ray actors (0: as many as the cluster fits).")
RAY_CPUS_OPTION = typer.Option(2.0, min=0.0, help="CPUs (= torch threads) per Ray actor.")
RAY_GPUS_OPTION = typer.Option(-1.0, help="GPUs per Ray actor (-1: 1 if the cluster has GPUs).")


def _engine(name: str) -> str:
    if name not in ("local", "ray"):
        raise typer.BadParameter(f"--engine must be local or ray, not {name!r}")
    return name


@app.command("train-detector")
def train_detector_cmd(
    data: str = typer.Option(..., help="YOLO dataset yaml (train, val, names), e.g. WORLD/yolo."),
    out: str = typer.Option(
        "models/detector.safetensors",
        help="Trained weights: .safetensors (no pickle) or .pt (ultralytics' checkpoint).",
    ),
    preset: str = typer.Option("tiny", help="Preset whose detector architecture starts."),
    detector: str = typer.Option("", help="Start from these local YOLO weights instead."),
    epochs: int = typer.Option(30, min=1, help="Training epochs."),
    imgsz: int = typer.Option(160, min=32, help="Training and validation image size."),
    batch: int = typer.Option(32, min=1, help="Images per batch."),
    workers: int = typer.Option(0, min=0, help="Dataloader workers (0: main process)."),
    patience: int = typer.Option(0, min=0, help="Stop after N epochs without gain (0: never)."),
    lr0: float = typer.Option(0.004, min=0.0, help="Initial learning rate (AdamW)."),
    mosaic: float = typer.Option(0.0, min=0.0, max=1.0, help="Mosaic augmentation share."),
    seed: int = typer.Option(0, help="Training seed (deterministic on CPU)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    resume: bool = typer.Option(False, help="Continue from OUT's .runs/train/weights/last.pt."),
) -> None:
    """Fine-tune YOLO with ultralytics' trainer on a dataset with boxes; report val mAP50."""
    from pipeline.detector_train import DetectorTrainParams, format_summary, train_detector

    params = DetectorTrainParams(
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        workers=workers,
        patience=patience,
        seed=seed,
        lr0=lr0,
        mosaic=mosaic,
    )
    try:
        s = train_detector(data, out, preset, detector or None, params, device, resume)
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    typer.echo(format_summary(s))


@app.command("detect-objects")
def detect_objects_cmd(
    pairs: str = typer.Option("data/prepared/pairs.parquet", help="Prepared pairs."),
    out: str = typer.Option("data/objects/boxes.parquet", help="Boxes parquet to write."),
    preset: str = typer.Option("tiny", help="Model preset: tiny | base."),
    detector: str = typer.Option("", help="Local YOLO weights file (overrides the preset)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(16, min=1, help="Images per YOLO forward."),
    imgsz: int = typer.Option(640, min=32, help="YOLO input size."),
    conf: float = typer.Option(0.25, min=0.0, max=1.0, help="Confidence threshold."),
    iou: float = typer.Option(0.7, min=0.0, max=1.0, help="NMS IoU threshold."),
    top_k: int = typer.Option(10, min=0, help="Boxes kept per image (by confidence)."),
    num_workers: int = typer.Option(
        -1, min=-1, help="DataLoader workers decoding images (-1: auto, 0 on CPU)."
    ),
    impl: str = typer.Option(
        "fast", help="fast (uint8 batches, batched NMS) | ultralytics (YOLO.predict, reference)."
    ),
    pre_nms_top_k: int = typer.Option(1000, min=1, help="fast: candidates per image into NMS."),
    engine: str = ENGINE_OPTION,
    ray_address: str = RAY_ADDRESS_OPTION,
    ray_actors: int = RAY_ACTORS_OPTION,
    ray_cpus_per_actor: float = RAY_CPUS_OPTION,
    ray_gpus_per_actor: float = RAY_GPUS_OPTION,
) -> None:
    """YOLO boxes (top-K above a confidence) for every prepared image."""
    from pipeline import checks

    _engine(engine)
    checks.pairs_table(pairs, ("id", "image_path"))
    checks.preset(preset)
    checks.weights_file(detector, "detector weights", "--detector")
    checks.device(device)
    from pipeline.detect import DetectParams, detect_objects

    params = DetectParams(
        batch_size=batch_size,
        imgsz=imgsz,
        conf=conf,
        iou=iou,
        top_k=top_k,
        num_workers=num_workers,
        impl=impl,
        pre_nms_top_k=pre_nms_top_k,
    )
    try:
        params.check()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if _engine(engine) == "ray":
        from pipeline.ray_engine import detect_objects_ray

        s = detect_objects_ray(
            pairs,
            out,
            preset,
            detector or None,
            params,
            device,
            address=ray_address or None,
            actors=ray_actors,
            cpus_per_actor=ray_cpus_per_actor,
            gpus_per_actor=ray_gpus_per_actor,
        )
    else:
        s = detect_objects(pairs, out, preset, detector or None, params, device)
    typer.echo(
        f"detect-objects: {s['pairs']} pairs ({s['images']} distinct images), {s['boxes']} boxes, "
        f"{s['without_detections']} without detections, {s['undecodable']} undecodable; "
        f"{s['seconds']} s ({s['images_per_s']} img/s) -> {s['out']}"
    )


@app.command("adapt-teacher")
def adapt_teacher_cmd(
    out: str = typer.Option("models/teacher.safetensors", help="Adapted open_clip weights."),
    pairs: str = typer.Option("", help="Prepared pairs.parquet: image-caption InfoNCE."),
    annotations: str = typer.Option(
        "", help="truth.jsonl (image, boxes, classes, relation): crop / image-prompt InfoNCE."
    ),
    entities: str = typer.Option(
        "", help="Entity vocabulary (entities.json): its other nouns become negatives."
    ),
    relations: str = typer.Option(
        "", help="Relation vocabulary (relations.json): its other labels become negatives."
    ),
    negatives: int = typer.Option(64, min=0, help="Vocabulary negatives sampled per step."),
    preset: str = typer.Option("tiny", help="Model preset whose CLIP is adapted."),
    clip: str = typer.Option("", help="Start from this local CLIP checkpoint instead."),
    steps: int = typer.Option(1000, min=1, help="Optimiser steps."),
    batch_size: int = typer.Option(64, min=2, help="Items per objective per step."),
    lr: float = typer.Option(5e-4, min=0.0, help="AdamW peak learning rate."),
    weight_decay: float = typer.Option(0.05, min=0.0, help="AdamW weight decay (matrices)."),
    warmup_steps: int = typer.Option(50, min=0, help="Linear warmup, then cosine decay."),
    weight_caption: float = typer.Option(1.0, min=0.0, help="Caption objective (0: off)."),
    weight_entity: float = typer.Option(1.0, min=0.0, help="Crop-entity objective (0: off)."),
    weight_relation: float = typer.Option(1.0, min=0.0, help="Image-relation objective (0: off)."),
    weight_scene: float = typer.Option(
        1.0, min=0.0, help="Whole image vs the entities it contains (0: off)."
    ),
    weight_probe: float = typer.Option(
        1.0, min=0.0, help="Auxiliary linear probes on the image features (0: off)."
    ),
    box_jitter: float = typer.Option(0.1, min=0.0, help="Crop box jitter, fraction of its size."),
    crop_margin: float = typer.Option(
        0.0,
        min=0.0,
        max=1.0,
        help="Whole images: cut up to this share of the margins around the true boxes (0: off).",
    ),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Mirror half the images and crops."),
    template_loss: str = typer.Option(
        "each", help="each (one loss per template: each labels alone) | ensemble (their mean)."
    ),
    resize_mode: str = typer.Option("letterbox", help="letterbox | center_crop (as labeling)."),
    holdout: float = typer.Option(0.1, min=0.0, max=0.9, help="Annotated images held out."),
    entity_templates: str = typer.Option(
        "all", help="Entity templates by name (embed-prompts' names: 1, 2, 1+2, all)."
    ),
    relation_templates: str = typer.Option(
        "all", help="Relation templates by name (A, B, C, A+B, all)."
    ),
    seed: int = typer.Option(0, help="Seed of the batches, jitter and held-out images."),
    resume: bool = typer.Option(False, help="Continue from OUT's .state folder."),
    ckpt_every: int = typer.Option(200, min=1, help="Save a resumable state every N steps."),
) -> None:
    """Adapt the CLIP teacher to a corpus contrastively (captions, crops, relations)."""
    from pipeline.prompts import named_templates
    from pipeline.teacher import TeacherParams, adapt_teacher

    try:
        params = TeacherParams(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            seed=seed,
            weight_caption=weight_caption,
            weight_entity=weight_entity,
            weight_relation=weight_relation,
            weight_scene=weight_scene,
            weight_probe=weight_probe,
            box_jitter=box_jitter,
            crop_margin=crop_margin,
            flip=flip,
            template_loss=template_loss,
            resize_mode=resize_mode,
            holdout=holdout,
            negatives=negatives,
        )
        s = adapt_teacher(
            out,
            pairs or None,
            annotations or None,
            preset,
            clip or None,
            params,
            named_templates(entity_templates, "entity"),
            named_templates(relation_templates, "relation"),
            resume=resume,
            ckpt_every=ckpt_every,
            entities_path=entities or None,
            relations_path=relations or None,
        )
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    first, last, held = s["loss_first"], s["loss_last"], s["held_out"]
    typer.echo(
        f"adapt-teacher: {s['steps']} steps in {s['seconds']} s -> {s['out']} (+ .json, .png)\n"
        f"  data: {s['data']['caption_pairs']} caption pairs, {s['data']['crops']} crops of "
        f"{len(s['data']['classes'])} classes, {s['data']['relation_images']} relation images\n"
        "  loss first -> last: "
        + ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in last if k != "step")
        + f"\n  held-out top-1: entity {held['entity_top1']}, relation {held['relation_top1']}"
    )


@app.command("embed-prompts")
def embed_prompts_cmd(
    entities: str = typer.Option("data/vocab/entities.json", help="Entity vocabulary."),
    relations: str = typer.Option("data/vocab/relations.json", help="Relation vocabulary."),
    out: str = typer.Option("data/vocab/prompts.safetensors", help="Embeddings to write."),
    preset: str = typer.Option("tiny", help="Model preset: tiny | base."),
    clip: str = typer.Option("", help="Local CLIP checkpoint (.safetensors) for the preset."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    entity_templates: str = typer.Option(
        "1",
        help="The paper's entity templates by name: 1 'This is an image of {entity}.', "
        "2 'An image of {entity} is shown here.'; 1+2 or all ensembles them.",
    ),
    relation_templates: str = typer.Option(
        "A",
        help="The paper's relation templates by name: A 'This image shows the relation of "
        "{relation}.', B 'The relation of {relation} is shown in this image.', C 'The relation "
        "between the objects in the image is {relation}.'; e.g. A+B+C or all ensembles them.",
    ),
    entity_template: list[str] = typer.Option(
        [],
        "--entity-template",
        help="Your own entity template with {entity} (repeat to ensemble); replaces "
        "--entity-templates.",
    ),
    relation_template: list[str] = typer.Option(
        [],
        "--relation-template",
        help="Your own relation template with {relation} (repeat to ensemble); replaces "
        "--relation-templates.",
    ),
    batch_size: int = typer.Option(256, min=1, help="Prompts per text-tower forward."),
) -> None:
    """Encode every entity and relation prompt once with the CLIP text tower."""
    from pipeline import checks

    checks.vocabulary(entities, "entities")
    checks.vocabulary(relations, "relations")
    for field, templates in (("entity", entity_template), ("relation", relation_template)):
        for template in templates:
            if "{" + field + "}" not in template:
                raise InputError(
                    f"--{field}-template {template!r} has no {{{field}}} placeholder",
                    f"write the {field} as {{{field}}}, e.g. 'This is an image of {{{field}}}.'",
                )
    checks.preset(preset)
    checks.weights_file(clip, "CLIP checkpoint", "--clip")
    checks.device(device)
    from pipeline.prompts import embed_prompts, named_templates

    try:
        ent_t = entity_template or named_templates(entity_templates, "entity")
        rel_t = relation_template or named_templates(relation_templates, "relation")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    s = embed_prompts(
        entities, relations, out, preset, clip or None, ent_t, rel_t, batch_size, device
    )
    typer.echo(
        f"embed-prompts: {s['entities']} entities, {s['relations']} relations "
        f"({s['prompts_encoded']} prompts, dim {s['dim']}) in {s['seconds']} s -> {s['out']}"
    )


@app.command("label-objects")
def label_objects_cmd(
    pairs: str = typer.Option("data/prepared/pairs.parquet", help="Prepared pairs."),
    boxes: str = typer.Option("data/objects/boxes.parquet", help="Detections."),
    prompts: str = typer.Option("data/vocab/prompts.safetensors", help="Prompt embeddings."),
    entities: str = typer.Option("data/vocab/entities.json", help="Entity vocabulary."),
    relations: str = typer.Option("data/vocab/relations.json", help="Relation vocabulary."),
    rejected: str = typer.Option(
        "data/prepared/rejected.jsonl", help="prepare's rejections, counted into the manifest."
    ),
    out: str = typer.Option("shards", help="Shard folder."),
    stats: str = typer.Option("", help="Where to write timings (JSON); not written if empty."),
    metrics: str = typer.Option(
        "", help="Where to write the headline counts (JSON, no timings); not written if empty."
    ),
    preset: str = typer.Option("tiny", help="Model preset: tiny | base."),
    clip: str = typer.Option("", help="Local CLIP checkpoint (.safetensors) for the preset."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    samples_per_shard: int = typer.Option(1000, min=1, help="Samples per shard (by order)."),
    image_batch_size: int = typer.Option(32, min=1, help="Whole images per CLIP forward."),
    crop_batch_size: int = typer.Option(128, min=1, help="Object crops per CLIP forward."),
    num_workers: int = typer.Option(
        -1, min=-1, help="DataLoader workers (0: in-process; -1: auto, 2 on CPU)."
    ),
    tau: float = typer.Option(1.0, min=1e-6, help="Softmax temperature."),
    logit_scale: str = typer.Option(
        "model",
        help="CLIP logit scale s: 'model' (the loaded CLIP's exp(logit_scale)) or a number.",
    ),
    resize_mode: str = typer.Option(
        "letterbox", help="letterbox (pad to square: whole image) | center_crop (open_clip's)."
    ),
    decode: str = typer.Option(
        "auto", help="workers (PIL) | device (torchvision; nvjpeg on CUDA) | auto (device on CUDA)."
    ),
    k_ent: int = typer.Option(10, min=1, help="Kept q_ent entries per object."),
    k_rel: int = typer.Option(10, min=1, help="Kept q_rel entries per image."),
    crop_padding: float = typer.Option(0.0, min=0.0, help="Crop padding, fraction of box size."),
    max_side: int = typer.Option(512, min=1, help="Longest side of the stored jpg."),
    jpeg_quality: int = typer.Option(90, min=1, max=100, help="Stored jpg quality."),
    seed: int = typer.Option(0, help="Seed (recorded; labeling itself draws no randomness)."),
    stage_params: str = typer.Option("", help="params.yaml to record in the manifest."),
    engine: str = ENGINE_OPTION,
    ray_address: str = RAY_ADDRESS_OPTION,
    ray_actors: int = RAY_ACTORS_OPTION,
    ray_cpus_per_actor: float = RAY_CPUS_OPTION,
    ray_gpus_per_actor: float = RAY_GPUS_OPTION,
) -> None:
    """CLIP soft labels for every object crop (q_ent) and image (q_rel) -> WebDataset shards."""
    from pipeline import checks

    _engine(engine)
    checks.pairs_table(pairs, ("id", "source", "image_path", "caption", "itm"))
    checks.boxes_cover_pairs(boxes, pairs)
    checks.vocabulary(entities, "entities")
    checks.vocabulary(relations, "relations")
    checks.preset(preset)
    checks.weights_file(clip, "CLIP checkpoint", "--clip")
    checks.prompts_current(prompts, preset, clip or None, entities, relations)
    checks.device(device)
    stage_record = _parse_params(stage_params)
    from pipeline.label import LabelParams, label_objects

    params = LabelParams(
        samples_per_shard=samples_per_shard,
        image_batch_size=image_batch_size,
        crop_batch_size=crop_batch_size,
        num_workers=num_workers,
        tau=tau,
        logit_scale=_logit_scale(logit_scale),
        k_ent=k_ent,
        k_rel=k_rel,
        crop_padding=crop_padding,
        max_side=max_side,
        jpeg_quality=jpeg_quality,
        seed=seed,
        resize_mode=resize_mode,
        decode=decode,
    )
    try:
        params.check()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    run = label_objects
    extra: dict = {}
    if _engine(engine) == "ray":
        from pipeline.ray_engine import label_objects_ray as run

        extra = dict(
            address=ray_address or None,
            actors=ray_actors,
            cpus_per_actor=ray_cpus_per_actor,
            gpus_per_actor=ray_gpus_per_actor,
        )
    s = run(
        pairs,
        boxes,
        prompts,
        entities,
        relations,
        out,
        preset,
        clip or None,
        params,
        device,
        prepare_rejected_path=rejected or None,
        stats_path=stats or None,
        stage_params=stage_record,
        **extra,
    )
    c, t = s["counts"], s["timing"]
    if metrics:
        from pmu.io import write_json_atomic

        Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            metrics,
            {
                **c,
                "rejected_by_reason": s["rejected_by_reason"],
                "label_sharpness": s["label_sharpness"],
            },
        )
    typer.echo(
        f"label-objects: {c['samples']} samples in {c['shards']} shards ({t['shards_resumed']} "
        f"resumed), {c['objects']} objects, {c['images_without_objects']} images without "
        f"detections, {c['rejected']} rejected (prepare {c['rejected_prepare']}, "
        f"label {c['rejected_label']}) -> {s['out']}"
    )
    for reason, n in s["rejected_by_reason"].items():
        typer.echo(f"  rejected {n:>6}  {reason}")
    for kind, fig in s["label_sharpness"].items():
        if fig["labels"]:
            typer.echo(
                f"  {kind}: mean top-1 mass {fig['mean_top1_mass']:.3f}, beyond the top-1 "
                f"{fig['mean_mass_beyond_top1']:.3f}, entropy {fig['mean_entropy_nats']:.3f} "
                f"nats (uniform {fig['uniform_entropy_nats']:.3f}) over {fig['labels']} labels"
            )
    typer.echo(
        f"  {t['images_labelled_this_run']} images in {t['seconds_loop']} s "
        f"({t['images_per_s']} img/s; CLIP {t.get('seconds_clip_encode', '-')} s) on "
        f"{t['device']} with {t['num_workers']} workers, engine {t['engine']}; "
        f"total {t['seconds_total']} s"
    )


@app.command("score-labels")
def score_labels_cmd(
    shard_dir: str = typer.Argument("shards", help="Labelled shard folder."),
    pairs: str = typer.Option("data/prepared/pairs.parquet", help="Prepared pairs (id -> image)."),
    truth: str = typer.Option(..., help="truth.jsonl: per image boxes, classes and relation."),
    out: str = typer.Option("", help="Write the figures as JSON here ('' = do not)."),
    iou: float = typer.Option(0.5, min=0.0, max=1.0, help="IoU for a detection to match."),
) -> None:
    """Score labels against ground truth: detector recall, q_ent top-1/top-5, q_rel top-1."""
    from pipeline.score import format_scores, score_labels
    from pmu.io import write_json_atomic

    try:
        scores = score_labels(shard_dir, pairs, truth, iou)
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    typer.echo(format_scores(scores))
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, scores)


def _logit_scale(value: str) -> float | None:
    """`model` (or empty) -> None (read from the CLIP); otherwise a positive number."""
    if value.strip().lower() in ("model", "auto", ""):
        return None
    try:
        scale = float(value)
    except ValueError:
        msg = f"--logit-scale must be 'model' or a number, not {value!r}"
        raise typer.BadParameter(msg) from None
    if not scale > 0:
        raise typer.BadParameter("--logit-scale must be > 0")
    return scale


@app.command("verify")
def verify_cmd(
    shard_dir: str = typer.Argument("shards", help="Folder with shard-*.tar, sizes.json, ..."),
    tol: float = typer.Option(1e-4, min=0.0, help="Tolerance of probability sums."),
    limit: int = typer.Option(50, min=1, help="Problems listed at most."),
    quick: bool = typer.Option(
        False, "--quick", help="Skip the sha256 check of the files against manifest.json."
    ),
) -> None:
    """Check every shard against the contract and manifest.json's sha256 of every file;
    exit 1 with a report when anything is wrong."""
    from pipeline import checks

    checks.shard_folder(shard_dir)
    from pipeline.verify import verify_shards

    report = verify_shards(shard_dir, tol, check_hashes=not quick)
    typer.echo(report.render(limit))
    if not report.ok:
        raise typer.Exit(code=1)


def _truthy(value: str, name: str) -> bool:
    """Boolean options take a value (true/false) so DVC can pass `${group.flag}` directly."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise typer.BadParameter(f"{name} expects true or false, got {value!r}")


@app.command("prepare")
def prepare_cmd(
    source: str = typer.Option("sample", help="sample | newsclippings | table | wds | hf | world."),
    input: str = typer.Option(
        None,
        "--input",
        help="sample: folder (default: bundled); newsclippings: annotation JSON; "
        "table: .parquet/.csv/.jsonl; wds: a tar or a folder of tars; "
        "hf: a save_to_disk folder or a hub dataset name; world: a synth-world folder (its "
        "corpus) or one of its split folders (e.g. DIR/adapt).",
    ),
    out: str = typer.Option("data/prepared", help="Output folder for pairs.parquet etc."),
    image_root: str = typer.Option(
        None,
        help="Root of relative image paths (default: the input's folder); paths may not leave it.",
    ),
    allow_outside_root: bool = typer.Option(
        False,
        "--allow-outside-root",
        help="Read image paths that leave the image root (../, absolute elsewhere) too.",
    ),
    visualnews_data: str = typer.Option(None, help="VisualNews data.json (newsclippings)."),
    id_col: str = typer.Option("id", help="table, hf: id column (row number when absent)."),
    image_col: str = typer.Option(
        "image_path", help="table, hf: image column (a path; hf: also an Image feature)."
    ),
    caption_col: str = typer.Option("caption", help="table, hf: caption column."),
    itm_col: str = typer.Option("itm", help="table, hf: optional match column (exactly 0 or 1)."),
    split: str = typer.Option(
        None, help="hf: the split to read (default: train, or the only one)."
    ),
    negatives: str = typer.Option(
        "true", help="true|false: generate mismatched pairs for sources that have none."
    ),
    negative_ratio: float = typer.Option(1.0, min=0.0, max=1.0, help="Negatives per positive."),
    seed: int = typer.Option(0, help="Seed of the negative-pair shuffle."),
    max_pixels: int = typer.Option(50_000_000, min=1, help="Reject larger images (header)."),
    max_caption_chars: int = typer.Option(2000, min=1, help="Reject longer captions."),
    workers: int = typer.Option(1, min=1, help="Processes decoding images."),
    chunk_size: int = typer.Option(
        4096, min=1, help="Records per saved chunk (a killed run resumes after the last one)."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Validate image-caption pairs into pairs.parquet; rejections go to rejected.jsonl."""
    negatives = _truthy(negatives, "--negatives")
    from pipeline.prepare import format_summary, prepare
    from pipeline.prepare_work import describe_inputs
    from pipeline.readers import read_source
    from pipeline.readers.sample import default_sample_dir
    from pipeline.readers.tabular import Columns

    # DVC passes "" for unset options.
    image_root, visualnews_data, split = image_root or None, visualnews_data or None, split or None
    columns = Columns(id_col, image_col, caption_col, itm_col)
    image_store = Path(out) / "images"  # hf: images held as bytes, content-addressed
    records = read_source(
        source,
        input,
        image_root,
        visualnews_data,
        columns,
        allow_outside_root=allow_outside_root,
        split=split,
        image_store=image_store,
    )
    if source == "world":  # fingerprint the pairs file, not every file of the world
        from pipeline.readers.world import world_pairs_path

        input = str(world_pairs_path(input))
    params = {
        "source": source,
        "negatives": negatives,
        "negative_ratio": negative_ratio,
        "seed": seed,
        "max_pixels": max_pixels,
        "max_caption_chars": max_caption_chars,
    }
    options = {"allow_outside_root": True} if allow_outside_root else {}
    if source == "hf":
        options.update(split=split, image_store=str(image_store))
    result = prepare(
        records,
        out,
        max_pixels=max_pixels,
        max_caption_chars=max_caption_chars,
        negatives=negatives,
        negative_ratio=negative_ratio,
        seed=seed,
        workers=workers,
        progress=progress,
        params=params,
        chunk_size=chunk_size,
        inputs=describe_inputs(
            source,
            input if input or source != "sample" else default_sample_dir(),
            image_root,
            visualnews_data,
            columns if source in ("table", "hf") else None,
            options,
        ),
    )
    typer.echo(format_summary(result, out))


@app.command("mine-nouns")
def mine_nouns_cmd(
    pairs: str = typer.Option("data/prepared/pairs.parquet", help="pairs.parquet from prepare."),
    out: str = typer.Option("data/vocab/entities.json", help="Entity vocabulary to write."),
    m: int = typer.Option(1000, "--m", min=1, help="Keep the M most frequent noun lemmas."),
    spacy_model: str = typer.Option(
        "auto", help="spaCy model name or path; auto prefers en_core_web_sm."
    ),
    batch_size: int = typer.Option(256, min=1, help="nlp.pipe batch size."),
    include_propn: bool = typer.Option(False, help="Count proper nouns too."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Mine the entity vocabulary: the top-M caption noun lemmas with counts."""
    from pipeline import checks

    checks.pairs_table(pairs, ("caption",))
    from pipeline.nouns import format_summary, mine_nouns

    doc = mine_nouns(pairs, out, m, spacy_model, batch_size, include_propn, progress)
    typer.echo(format_summary(doc, out))


@app.command("fetch-relations")
def fetch_relations_cmd(
    out: str = typer.Option("data/vocab/relations.json", help="Relation vocabulary to write."),
    l: int = typer.Option(1000, "--l", min=1, help="Keep the first L relations (see --order)."),  # noqa: E741
    live: str = typer.Option("false", help="true|false: query Wikidata SPARQL (else snapshot)."),
    order: str = typer.Option(
        "relevance",
        help="relevance: properties about people, organisations, places, works and events "
        "first, off-topic domains last (pid order within each); pid: numeric pid order.",
    ),
    from_file: str = typer.Option(
        "",
        "--from",
        help="Your own relation list instead of Wikidata: TSV with pid/label header, JSON, or "
        "one label per line; kept in file order.",
    ),
    endpoint: str = typer.Option("https://query.wikidata.org/sparql", help="SPARQL endpoint."),
    timeout: float = typer.Option(30.0, min=0.01, help="Seconds per HTTP attempt."),
    retries: int = typer.Option(3, min=0, help="Retries after the first attempt."),
    backoff: float = typer.Option(2.0, min=0.0, help="First retry delay (doubles)."),
    cache: str = typer.Option(
        "data/vocab/wikidata_sparql_cache.json", help="Cache of the live answer ('' = none)."
    ),
) -> None:
    """Fetch L Wikidata item-to-item relations (or the bundled snapshot offline, or a file)."""
    from pipeline.relations import ORDERS, fetch_relations

    live = _truthy(live, "--live")
    if order not in ORDERS:
        raise typer.BadParameter(f"--order must be one of {', '.join(ORDERS)}, not {order!r}")
    try:
        doc = fetch_relations(
            out,
            l,
            live,
            endpoint,
            timeout,
            retries,
            backoff,
            cache or None,
            warn=lambda msg: typer.echo(msg, err=True),
            order=order,
            from_file=from_file or None,
        )
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    where = doc.get("endpoint", doc.get("snapshot", doc.get("file")))
    cached = " (cached)" if doc.get("cached") else ""
    cov = doc["mnre_coverage"]
    typer.echo(
        f"fetch-relations: {len(doc['relations'])} of {doc['n_available']} relations "
        f"(l={l}, order {doc['order']}) from {doc['source']}{cached}: {where}; wrote {out}\n"
        f"  MNRE relation types with a close property among them: {cov['covered']} of "
        f"{cov['types']}"
    )


@app.command("synth-world")
def synth_world_cmd(
    out: str = typer.Option(..., "--out", help="World folder to write (replaced if a world)."),
    n: int = typer.Option(2000, "--n", min=2, help="Corpus images (unlabeled pretraining pairs)."),
    seed: int = typer.Option(0, help="World seed: the same seed gives byte-identical files."),
    n_adapt: int = typer.Option(2000, min=8, help="Adapt images (teacher/detector adaptation)."),
    mner_train: int = typer.Option(400, min=1, help="MNER train sentences."),
    mner_dev: int = typer.Option(200, min=1, help="MNER dev sentences."),
    mner_test: int = typer.Option(400, min=1, help="MNER test sentences."),
    mre_train: int = typer.Option(400, min=1, help="MRE train samples."),
    mre_dev: int = typer.Option(200, min=1, help="MRE dev samples."),
    mre_test: int = typer.Option(400, min=1, help="MRE test samples."),
    image_size: int = typer.Option(160, min=64, max=2048, help="Longest image side (pixels)."),
    workers: int = typer.Option(1, min=1, help="Processes rendering images (same bytes)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Generate the synthetic world: scenes with known boxes and relations, captions, MNER/MRE."""
    from pipeline.world import build_world

    try:
        s = build_world(
            out,
            n=n,
            seed=seed,
            n_adapt=n_adapt,
            mner=(mner_train, mner_dev, mner_test),
            mre=(mre_train, mre_dev, mre_test),
            image_size_px=image_size,
            workers=workers,
            progress=progress,
        )
    except (ValueError, FileExistsError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    c = s["counts"]
    ner = {k: v["sentences"] for k, v in c["mner"].items()}
    rel = {k: v["samples"] for k, v in c["mre"].items()}
    typer.echo(
        f"synth-world: {s['jobs']} images, {s['files']} files in {s['seconds']} s -> {s['out']}\n"
        f"  corpus/  {c['corpus']['images']} images, {c['corpus']['pairs']} pairs "
        f"({c['corpus']['mismatched']} mismatched); truth.jsonl\n"
        f"  adapt/   {c['adapt']['images']} images; yolo/ {c['yolo']['train']} train + "
        f"{c['yolo']['val']} val\n"
        f"  mner/    train/dev/test {ner['train']}/{ner['dev']}/{ner['test']} sentences\n"
        f"  mre/     train/dev/test {rel['train']}/{rel['dev']}/{rel['test']} samples\n"
        f"  relations.tsv, world.json (tables, counts, sha256 of every file)\n"
        f"  next: pipeline prepare --source world --input {s['out']}"
    )
