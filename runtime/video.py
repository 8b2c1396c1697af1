"""Video I/O: H.264 mp4 written atomically (runtime/atomic.py) and deterministically, and read back for tests."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] float in [-1, 1] -> [F, H, W, 3] uint8 in host RAM, converted where the video is, one frame at a
    time (small temporaries): from a GPU, half the bytes of a bf16 video cross the bus and the CPU never passes over
    it."""
    out = torch.empty(*video.shape[1:], 3, dtype=torch.uint8, device=video.device)
    for f in range(video.shape[1]):
        out[f] = ((video[:, f].float().clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
    return out.cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18) -> Path:
    """Encode [F, H, W, 3] uint8 frames as H.264 (yuv420p) to `path` (.mp4); a failure leaves no partial file behind.
    The same frames always give the same bytes: x264's macroblock-tree rate control is off (with it on, even in one
    thread, two encodes of the same frames often differed in a third of their decoded pixels), and every frame
    carries its timestamp."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [F, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {frames.shape[2]}x{frames.shape[1]}")
    import av  # here, not at import: GPU hosts without PyAV can still run everything but the mp4 writer

    with atomic_file(path, ".mp4") as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            for i, frame in enumerate(frames):
                f = av.VideoFrame.from_ndarray(frame, format="rgb24")
                f.pts, f.time_base = i, Fraction(1, fps)
                container.mux(stream.encode(f))
            container.mux(stream.encode())
    return Path(path)


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an mp4 to ([F, H, W, 3] uint8, fps)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)
