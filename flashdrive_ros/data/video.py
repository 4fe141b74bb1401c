"""H.264 MP4 encoding at a constant 30 fps, in the form the devkit's SeekVideoReader expects.

SeekVideoReader computes a frame's index as round(pts / pts_per_frame) with
pts_per_frame = 1 / (fps * time_base), so the stream must start at pts 0, have exactly one frame per
1/30 s tick and no B-frames (which would reorder and shift presentation timestamps).
"""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

FPS = 30
FRAME_PERIOD_US = 1e6 / FPS


class Mp4Writer:
    """Collects RGB frames and encodes them into an in-memory MP4."""

    def __init__(self, width: int, height: int, crf: int = 23, gop: int = FPS):
        if width % 2 or height % 2:
            raise ValueError(f"video width and height must be even for yuv420p, got {width}x{height}")
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=FPS)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.time_base = Fraction(1, FPS * 512)  # 15360 Hz: the common mp4 time base for 30 fps
        # ultrafast keeps 1080p encoding cheap; a keyframe every second bounds seek-and-decode cost.
        self.stream.options = {"preset": "ultrafast", "crf": str(crf), "g": str(gop), "bf": "0",
                               "x264-params": "bframes=0:scenecut=0", "threads": "1"}
        self.count = 0

    def add(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.count * 512
        frame.time_base = self.stream.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1

    def finish(self) -> bytes:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        return self.buffer.getvalue()
