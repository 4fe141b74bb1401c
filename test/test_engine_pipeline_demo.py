"""The demo command streams windows through the tiny engine and says what it is running."""

import numpy as np

from flashdrive_ros import demo


def test_procedural_windows_move_and_have_valid_history():
    wins = list(demo.procedural_windows(2, height=64, width=96))
    (f0, t0, xyz, rot, label), (f1, t1, _, _, _) = wins
    assert f0.shape == (4, 4, 64, 96, 3) and f0.dtype == np.uint8
    assert t1 - t0 == demo.STRIDE_US
    np.testing.assert_array_equal(f1[:, :3], f0[:, 1:])  # 75% overlap, as a real 10 Hz stream
    assert not np.array_equal(f0[:, 0], f0[:, 1])  # the scene moves between frames
    assert xyz.shape == (16, 3) and np.allclose(xyz[-1], 0) and rot.shape == (16, 3, 3)


def test_demo_runs_procedural_stream(capsys):
    assert demo.main(["--procedural", "--windows", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out or "checkpoint" in out  # states what weights are used
    assert "window 0" in out and "[full prefill]" in out
    assert "window 1" in out and "[streaming]" in out
    assert out.count("reasoning:") == 2 and out.count("latency:") == 2 and "first waypoints" in out
