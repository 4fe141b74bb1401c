"""Shared by the speculative engine tests: a random 4-camera clip and its streaming windows (128x128
frames, 16 image tokens each, 0.1 s apart, a straight ego history)."""

import numpy as np

H = W = 128
T0, STRIDE = 1_700_000, 100_000


def random_clip(n_windows: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (4, n_windows + 3, H, W, 3), dtype=np.uint8)


def window(clip, t):
    xyz = np.zeros((16, 3))
    xyz[:, 0] = np.linspace(-10.0 - 0.2 * t, 0.0, 16)
    return np.ascontiguousarray(clip[:, t:t + 4]), T0 + t * STRIDE, xyz, np.tile(np.eye(3), (16, 1, 1))
