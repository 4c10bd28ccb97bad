"""The shared layer of the project: what the pipeline and the trainer both use.

Its modules import nothing from `pipeline` or `trainer` (docs/architecture.md; the import-linter
contracts in pyproject.toml enforce it): io (atomic writes, hashes), errors (the one input-error
type), runtime (threads, devices, reproducible mode), settings (stage settings declared once),
presets (model presets as data), shards (the shard contract), truth (the truth.jsonl reader),
optim (the one optimizer and schedule factory) and train_state (resumable training states).
"""

__version__ = "0.1.0"  # the project's version (pyproject.toml), recorded in the manifests
