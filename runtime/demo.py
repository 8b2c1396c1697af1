"""The embedded demo model: a tiny model of Wan2.1's architecture trained on procedural shape videos
(export/train_demo.py), shipped with the package so `wanrt generate` works offline on a fresh machine."""
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "assets" / "demo-t2v"
