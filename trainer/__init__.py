"""Prompt Me Up trainer: pretraining on labelled shards, MNER/MRE fine-tuning."""
