"""Video I/O: H.264 mp4 written atomically (temp file in the same folder, then rename), and read back for tests."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] float in [-1, 1] -> [F, H, W, 3] uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18) -> Path:
    """Encode [F, H, W, 3] uint8 frames as H.264 (yuv420p) to `path`; a failure leaves no partial file behind."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [F, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {frames.shape[2]}x{frames.shape[1]}")
    import av  # here, not at import: GPU hosts without PyAV can still run everything but the mp4 writer

    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name that the encoder creates itself, so the video gets the usual permissions (mkstemp's are 0600)
    tmp = str(path.parent / f".{path.stem}.{uuid.uuid4().hex}.mp4.part")
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an mp4 to ([F, H, W, 3] uint8, fps)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)
