"""wanrt.runtime: checkpoints, the pipeline and its planner, streaming, and the CLI."""
from pathlib import Path

# A Wan2.1-architecture model of our own, trained on procedural shape videos (export/train_demo.py); what
# `wanrt generate` runs when given no model. bench/results/demo_train_h100.md says how it was trained and how it does.
DEMO_MODEL = Path(__file__).with_name("demo_model")
