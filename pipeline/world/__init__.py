"""A procedurally generated world with known ground truth (`pipeline synth-world`).

Rendered scenes of 12 object classes with boxes and one image-level relation each, news-style
captions (matched and mismatched pairs), and MNER / MRE data whose image-dependent entities and
relations only the image settles. Not to be confused with `pipeline.random_shards`, which writes
random contract-true shards for tests. Layout and contract: docs/world.md.
"""

from __future__ import annotations

from pipeline.world.build import GENERATOR_VERSION, WORLD_FILE, build_world

__all__ = ["GENERATOR_VERSION", "WORLD_FILE", "build_world"]
