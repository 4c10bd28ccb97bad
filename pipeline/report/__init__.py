"""A self-contained HTML report for judging soft-labelled shards by eye (`pipeline inspect`)."""

from pipeline.report.build import build_report

__all__ = ["build_report"]
