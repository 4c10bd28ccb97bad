"""Typer app: one thin command per stage. Heavy imports stay inside the commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="pipeline",
    help="Prompt Me Up labeling pipeline (image-caption pairs -> soft-labelled shards).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("presets")
def presets_cmd() -> None:
    """List the model presets and what each component loads."""
    from pipeline.models import PRESETS

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
        f"q_rel {summary['mean_kept_mass_rel']}"
    )
    for warning in summary["warnings"]:
        typer.echo(f"  warning: {warning}")


def _parse_params(spec: str | None) -> dict | None:
    """`--stage-params params.yaml` -> the dict recorded in the shard manifest."""
    if not spec:
        return None
    import yaml

    with open(spec, encoding="utf-8") as f:
        return yaml.safe_load(f)


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


@app.command("embed-prompts")
def embed_prompts_cmd(
    entities: str = typer.Option("data/vocab/entities.json", help="Entity vocabulary."),
    relations: str = typer.Option("data/vocab/relations.json", help="Relation vocabulary."),
    out: str = typer.Option("data/vocab/prompts.safetensors", help="Embeddings to write."),
    preset: str = typer.Option("tiny", help="Model preset: tiny | base."),
    clip: str = typer.Option("", help="Local CLIP checkpoint (.safetensors) for the preset."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    # The underscore spellings are what DVC's dict unpacking of params.yaml produces.
    entity_template: list[str] = typer.Option(
        [],
        "--entity-template",
        "--entity_template",
        help="Entity prompt template with {entity}; repeat to ensemble (default: paper's).",
    ),
    relation_template: list[str] = typer.Option(
        [],
        "--relation-template",
        "--relation_template",
        help="Relation prompt template with {relation}; repeat to ensemble.",
    ),
    batch_size: int = typer.Option(256, min=1, help="Prompts per text-tower forward."),
) -> None:
    """Encode every entity and relation prompt once with the CLIP text tower."""
    from pipeline.prompts import ENTITY_TEMPLATES, RELATION_TEMPLATES, embed_prompts

    s = embed_prompts(
        entities,
        relations,
        out,
        preset,
        clip or None,
        entity_template or ENTITY_TEMPLATES,
        relation_template or RELATION_TEMPLATES,
        batch_size,
        device,
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
        stage_params=_parse_params(stage_params),
        **extra,
    )
    c, t = s["counts"], s["timing"]
    typer.echo(
        f"label-objects: {c['samples']} samples in {c['shards']} shards ({t['shards_resumed']} "
        f"resumed), {c['objects']} objects, {c['images_without_objects']} images without "
        f"detections, {c['rejected']} rejected (prepare {c['rejected_prepare']}, "
        f"label {c['rejected_label']}) -> {s['out']}"
    )
    for reason, n in s["rejected_by_reason"].items():
        typer.echo(f"  rejected {n:>6}  {reason}")
    typer.echo(
        f"  {t['images_labelled_this_run']} images in {t['seconds_loop']} s "
        f"({t['images_per_s']} img/s; CLIP {t.get('seconds_clip_encode', '-')} s) on "
        f"{t['device']} with {t['num_workers']} workers, engine {t['engine']}; "
        f"total {t['seconds_total']} s"
    )


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
) -> None:
    """Check every shard against the contract; exit 1 with a report when anything is wrong."""
    from pipeline.verify import verify_shards

    report = verify_shards(shard_dir, tol)
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
    source: str = typer.Option("sample", help="sample | newsclippings | table | wds."),
    input: str = typer.Option(
        None,
        "--input",
        help="sample: folder (default: bundled); newsclippings: annotation JSON; "
        "table: .parquet/.csv/.jsonl; wds: a tar or a folder of tars.",
    ),
    out: str = typer.Option("data/prepared", help="Output folder for pairs.parquet etc."),
    image_root: str = typer.Option(None, help="Root for relative image paths (table, NCP)."),
    visualnews_data: str = typer.Option(None, help="VisualNews data.json (newsclippings)."),
    id_col: str = typer.Option("id", help="table: id column (row number when absent)."),
    image_col: str = typer.Option("image_path", help="table: image path column."),
    caption_col: str = typer.Option("caption", help="table: caption column."),
    itm_col: str = typer.Option("itm", help="table: optional 0/1 match column."),
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
    from pipeline.prepare import format_summary, prepare

    negatives = _truthy(negatives, "--negatives")
    from pipeline.prepare_work import describe_inputs
    from pipeline.readers import read_source
    from pipeline.readers.sample import default_sample_dir
    from pipeline.readers.tabular import Columns

    image_root, visualnews_data = image_root or None, visualnews_data or None  # DVC passes ""
    columns = Columns(id_col, image_col, caption_col, itm_col)
    try:
        records = read_source(source, input, image_root, visualnews_data, columns)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    params = {
        "source": source,
        "negatives": negatives,
        "negative_ratio": negative_ratio,
        "seed": seed,
        "max_pixels": max_pixels,
        "max_caption_chars": max_caption_chars,
    }
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
            columns if source == "table" else None,
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
    from pipeline.nouns import SpacyModelMissing, format_summary, mine_nouns

    try:
        doc = mine_nouns(pairs, out, m, spacy_model, batch_size, include_propn, progress)
    except SpacyModelMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(format_summary(doc, out))


@app.command("fetch-relations")
def fetch_relations_cmd(
    out: str = typer.Option("data/vocab/relations.json", help="Relation vocabulary to write."),
    l: int = typer.Option(1000, "--l", min=1, help="Keep L relations (numeric pid order)."),  # noqa: E741
    live: str = typer.Option("false", help="true|false: query Wikidata SPARQL (else snapshot)."),
    endpoint: str = typer.Option("https://query.wikidata.org/sparql", help="SPARQL endpoint."),
    timeout: float = typer.Option(30.0, min=0.01, help="Seconds per HTTP attempt."),
    retries: int = typer.Option(3, min=0, help="Retries after the first attempt."),
    backoff: float = typer.Option(2.0, min=0.0, help="First retry delay (doubles)."),
    cache: str = typer.Option(
        "data/vocab/wikidata_sparql_cache.json", help="Cache of the live answer ('' = none)."
    ),
) -> None:
    """Fetch L Wikidata item-to-item relations, or use the bundled snapshot offline."""
    from pipeline.relations import fetch_relations

    live = _truthy(live, "--live")
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
    )
    where = doc.get("endpoint", doc.get("snapshot"))
    cached = " (cached)" if doc.get("cached") else ""
    typer.echo(
        f"fetch-relations: {len(doc['relations'])} of {doc['n_available']} relations "
        f"(l={l}) from {doc['source']}{cached}: {where}; wrote {out}"
    )


@app.callback()
def main() -> None:
    """Prompt Me Up labeling pipeline. Every stage is also a DVC stage (see dvc.yaml)."""
