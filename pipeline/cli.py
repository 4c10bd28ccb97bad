"""Typer app: one thin command per stage, its options generated from the stage's settings
(`pipeline/settings.py`, `pipeline/command.py`). Heavy imports stay inside the commands.

Bad input raises `pmu.errors.InputError` at a stage's own checks; `PipelineGroup` prints it in
one or two lines and exits 2 (`pipeline --debug` shows its traceback). Any other exception is a
bug: it keeps its traceback and a non-zero exit.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from pipeline import settings as st
from pipeline.command import stage_command
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
    "compare-shards",
    "score-labels",
    "inspect",
    "presets",
)


class PipelineGroup(TyperGroup):
    """The `pipeline` command group: pipeline-ordered help, and input errors as short messages."""

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


@stage_command(app, "synth-world", st.SynthWorldSettings)
def synth_world_cmd(s: st.SynthWorldSettings) -> None:
    """Generate the synthetic world: scenes with known boxes and relations, captions, MNER/MRE."""
    from pipeline.world.build import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "prepare", st.PrepareSettings, groups=("prepare",))
def prepare_cmd(s: st.PrepareSettings) -> None:
    """Validate image-caption pairs into pairs.parquet; rejections go to rejected.jsonl."""
    from pipeline.prepare import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "mine-nouns", st.MineNounsSettings, groups=("mine_nouns",))
def mine_nouns_cmd(s: st.MineNounsSettings) -> None:
    """Mine the entity vocabulary: the top-M caption noun lemmas with counts."""
    from pipeline.nouns import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "fetch-relations", st.FetchRelationsSettings, groups=("fetch_relations",))
def fetch_relations_cmd(s: st.FetchRelationsSettings) -> None:
    """Fetch L Wikidata item-to-item relations (or the bundled snapshot offline, or a file)."""
    from pipeline.relations import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "train-detector", st.TrainDetectorSettings, groups=("models", "train_detector"))
def train_detector_cmd(s: st.TrainDetectorSettings) -> None:
    """Fine-tune YOLO with ultralytics' trainer on a dataset with boxes; report val mAP50."""
    from pipeline.detector_train import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "detect-objects", st.DetectSettings, groups=("models", "detect"))
def detect_objects_cmd(s: st.DetectSettings) -> None:
    """YOLO boxes (top-K above a confidence) for every prepared image."""
    from pipeline.detect import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "adapt-teacher", st.AdaptTeacherSettings, groups=("models", "adapt_teacher"))
def adapt_teacher_cmd(s: st.AdaptTeacherSettings) -> None:
    """Adapt the CLIP teacher to a corpus contrastively (captions, crops, relations)."""
    from pipeline.teacher import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "embed-prompts", st.EmbedPromptsSettings, groups=("models", "embed_prompts"))
def embed_prompts_cmd(s: st.EmbedPromptsSettings) -> None:
    """Encode every entity and relation prompt once with the CLIP text tower."""
    from pipeline.prompts import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "label-objects", st.LabelSettings, groups=("models", "label"))
def label_objects_cmd(s: st.LabelSettings) -> None:
    """CLIP soft labels for every object crop (q_ent) and image (q_rel) -> WebDataset shards."""
    from pipeline.label import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "verify", st.VerifySettings)
def verify_cmd(s: st.VerifySettings) -> None:
    """Check every shard against the contract and manifest.json's sha256 of every file;
    exit 1 with a report when anything is wrong."""
    from pipeline.verify import run_stage

    report, ok = run_stage(s)
    typer.echo(report)
    if not ok:
        raise typer.Exit(code=1)


@stage_command(app, "compare-shards", st.CompareShardsSettings)
def compare_shards_cmd(s: st.CompareShardsSettings) -> None:
    """Compare two shard folders member by member (members.sha256): e.g. two machines' runs;
    exit 1 when any member differs."""
    from pipeline.compare_shards import run_stage

    report, same = run_stage(s.first, s.second, s.limit)
    typer.echo(report)
    if not same:
        raise typer.Exit(code=1)


@stage_command(app, "score-labels", st.ScoreLabelsSettings)
def score_labels_cmd(s: st.ScoreLabelsSettings) -> None:
    """Score labels against ground truth: detector recall, q_ent top-1/top-5, q_rel top-1."""
    from pipeline.score import run_stage

    typer.echo(run_stage(s))


@stage_command(app, "inspect", st.InspectSettings, groups=("inspect",))
def inspect_cmd(s: st.InspectSettings) -> None:
    """Write an HTML report of crops, soft labels and label statistics for judging by eye."""
    from pipeline.report.build import run_stage

    typer.echo(run_stage(s))
