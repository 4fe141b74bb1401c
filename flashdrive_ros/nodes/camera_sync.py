"""Camera synchronisation for the drive node (pure Python, no ROS).

The model needs, per camera, the frames at t0 - 0.3, -0.2, -0.1 and 0 s, so a one-tuple matcher
(message_filters) is not enough. We keep a short stamped ring buffer per camera, take t0 from an anchor
camera on a fixed inference stride, and pick for every camera the last frame at or before each target
time (the dataset rule, ``searchsorted(side="right") - 1``), accepting it only within a tolerance.
The t0 slot of every camera must be within tolerance (else the missing-camera policy applies); an older
slot without a frame repeats the next newer frame of that camera.

Payloads are opaque (the drive node stores undecoded ROS messages; decoding happens in its worker).
Times are integer microseconds.
"""
from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Any, Optional

MISSING_POLICIES = ("skip", "repeat_last", "black")


class AddStatus(enum.Enum):
    ACCEPTED = "accepted"
    OUT_OF_ORDER = "out_of_order"    # older than (or equal to) the camera's newest stamp: rejected
    TIME_JUMP = "time_jump"          # far backwards (clock reset / loop): all buffers cleared, accepted
    GAP = "gap"                      # forward jump larger than the gap threshold: accepted


@dataclass
class Window:
    """Frames of one inference window. ``frames[c][k]`` is camera c at t0 - (n-1-k)*period (oldest first);
    a payload of None means "fill with black" (policy 'black')."""
    t0_us: int
    frames: list
    stamps_us: list
    missing: list = field(default_factory=list)      # camera indices without a usable frame
    filled: dict = field(default_factory=dict)       # camera index -> policy used to fill it
    padded: dict = field(default_factory=dict)       # camera index -> older slots repeating a newer frame
    gap: bool = False                                # t0 far after the previous window
    superseded: int = 0                              # older ready windows skipped for this one
    ready_clock_us: int = 0                          # consumer's bookkeeping: clock when the window was
    ready_mono_s: float = 0.0                        # complete (node clock) and monotonic time then

    @property
    def ok(self) -> bool:
        return not self.missing


class CameraSync:
    """Per-camera ring buffers + anchor-camera t0 + per-frame tolerance + missing-camera policy."""

    def __init__(self, num_cameras: int = 4, anchor: int = 1, tolerance_us: int = 50_000,
                 num_frames: int = 4, period_us: int = 100_000, missing_policy: str = "skip",
                 time_jump_us: int = 1_000_000, gap_us: int = 150_000, max_buffer: int = 64):
        if not 0 <= anchor < num_cameras:
            raise ValueError(f"anchor camera {anchor} not in [0, {num_cameras})")
        if missing_policy not in MISSING_POLICIES:
            raise ValueError(f"missing_policy must be one of {MISSING_POLICIES}, got {missing_policy!r}")
        if tolerance_us < 0 or period_us <= 0:
            raise ValueError("tolerance must be >= 0 and period > 0")
        self.num_cameras = num_cameras
        self.anchor = anchor
        self.tolerance_us = int(tolerance_us)
        self.num_frames = num_frames
        self.period_us = int(period_us)
        self.missing_policy = missing_policy
        self.time_jump_us = int(time_jump_us)
        self.gap_us = int(gap_us)
        self.max_buffer = max_buffer
        # Anchor frames closer than this to the previous t0 are not t0 candidates: a quarter period is
        # below one camera frame at 30 fps yet absorbs stamp jitter of a 10 Hz anchor.
        self._stride_slack_us = self.period_us // 4
        self.clear()
        self.seen = [0] * num_cameras        # frames accepted per camera since construction
        self.rejected = [0] * num_cameras    # out-of-order frames per camera

    def clear(self) -> None:
        """Forget all frames and the window history (clip boundary / time jump)."""
        self._stamps: list[list[int]] = [[] for _ in range(self.num_cameras)]
        self._payloads: list[list[Any]] = [[] for _ in range(self.num_cameras)]
        self._last_emitted: Optional[int] = None
        self._last_frame: list[Optional[tuple[int, Any]]] = [None] * self.num_cameras

    def newest_stamp(self, cam: int) -> Optional[int]:
        s = self._stamps[cam]
        return s[-1] if s else None

    def add(self, cam: int, stamp_us: int, payload: Any) -> AddStatus:
        """Store one frame. Out-of-order frames are rejected; a far backwards stamp clears everything."""
        stamp_us = int(stamp_us)
        newest = self.newest_stamp(cam)
        if newest is None and self._last_frame[cam] is not None:
            newest = self._last_frame[cam][0]
        status = AddStatus.ACCEPTED
        if newest is not None:
            if stamp_us <= newest:
                if newest - stamp_us > self.time_jump_us:
                    self.clear()
                    status = AddStatus.TIME_JUMP
                else:
                    self.rejected[cam] += 1
                    return AddStatus.OUT_OF_ORDER
            elif stamp_us - newest > self.gap_us:
                status = AddStatus.GAP
        self._stamps[cam].append(stamp_us)
        self._payloads[cam].append(payload)
        self._last_frame[cam] = (stamp_us, payload)
        self.seen[cam] += 1
        self._prune()
        return status

    def _prune(self) -> None:
        anchor_newest = self.newest_stamp(self.anchor)
        horizon = None
        if anchor_newest is not None:
            # Oldest frame any future window may need: oldest target of the newest t0 minus tolerance,
            # minus one more period of slack for windows still waiting on a late camera.
            horizon = anchor_newest - self.num_frames * self.period_us - self.tolerance_us
        for c in range(self.num_cameras):
            st, pl = self._stamps[c], self._payloads[c]
            drop = 0
            if horizon is not None:
                # keep one frame at or before the horizon: it is the "last frame at or before" candidate
                drop = max(0, bisect.bisect_right(st, horizon) - 1)
            drop = max(drop, len(st) - self.max_buffer)
            if drop > 0:
                del st[:drop]
                del pl[:drop]

    def _candidates(self) -> list[int]:
        """Anchor stamps that may become t0, oldest first."""
        st = self._stamps[self.anchor]
        lo = -(1 << 62) if self._last_emitted is None else \
            self._last_emitted + self.period_us - self._stride_slack_us
        # an anchor frame is a t0 only once the anchor itself covers t0 - (n-1)*period: the clip start
        # (or the first frames after a jump) produce no windows rather than windows reported as broken
        span = (self.num_frames - 1) * self.period_us
        return [s for s in st if s >= lo and self._covers(self.anchor, s - span)]

    def _covers(self, cam: int, target: int) -> bool:
        st = self._stamps[cam]
        i = bisect.bisect_right(st, target) - 1
        return i >= 0 and target - st[i] <= self.tolerance_us

    def _decidable(self, t0: int, newest_any: int) -> bool:
        complete = all((self.newest_stamp(c) or -1 << 62) >= t0 for c in range(self.num_cameras))
        # A camera that has not reached t0 while another is already past t0 + tolerance is late or
        # silent: decide the window now (with the missing-camera policy) instead of waiting forever.
        return complete or newest_any > t0 + self.tolerance_us

    def pop_window(self) -> Optional[Window]:
        """Newest decidable window after the last one returned, or None. Older decidable candidates are
        skipped (counted in ``superseded``): the newest data wins."""
        cands = self._candidates()
        if not cands:
            return None
        newest_any = max((s[-1] for s in self._stamps if s), default=None)
        chosen = None
        for t0 in reversed(cands):
            if self._decidable(t0, newest_any):
                chosen = t0
                break
        if chosen is None:
            return None
        if self._last_emitted is None:
            skipped = sum(1 for t in cands if t < chosen)
        else:  # by time: the buffer may already have pruned the older candidates
            skipped = max(0, round((chosen - self._last_emitted) / self.period_us) - 1)
        win = self._build(chosen)
        win.superseded = skipped
        win.gap = self._last_emitted is not None and chosen - self._last_emitted > self.gap_us
        self._last_emitted = chosen
        return win

    def _build(self, t0: int) -> Window:
        n = self.num_frames
        frames, stamps, missing, filled, padded = [], [], [], {}, {}
        for c in range(self.num_cameras):
            st, pl = self._stamps[c], self._payloads[c]
            cam_frames, cam_stamps = [], []
            for k in range(n):  # newest first: k = 0 is the frame for t0
                target = t0 - k * self.period_us
                i = bisect.bisect_right(st, target) - 1
                if i >= 0 and target - st[i] <= self.tolerance_us:
                    cam_frames.append(pl[i])
                    cam_stamps.append(st[i])
                elif k > 0:
                    # an older slot without a frame (camera just (re)appeared, dropped frame) repeats the
                    # next newer one, like left-padding at a scene start, so one lost frame does not
                    # cost four windows
                    cam_frames.append(cam_frames[-1])
                    cam_stamps.append(cam_stamps[-1])
                    padded[c] = padded.get(c, 0) + 1
                else:
                    break
            if not cam_frames:
                cam_frames, cam_stamps = self._fill(c, t0)
                if cam_frames is None:
                    missing.append(c)
                    cam_frames, cam_stamps = [None] * n, [None] * n
                else:
                    filled[c] = self.missing_policy
            else:
                cam_frames.reverse()
                cam_stamps.reverse()
            frames.append(cam_frames)
            stamps.append(cam_stamps)
        return Window(t0_us=t0, frames=frames, stamps_us=stamps, missing=missing, filled=filled,
                      padded=padded)

    def _fill(self, cam: int, t0: int):
        n = self.num_frames
        if self.missing_policy == "black":
            return [None] * n, [None] * n
        if self.missing_policy == "repeat_last":
            # newest frame at or before t0 (any age within the buffer / last seen), repeated n times
            st = self._stamps[cam]
            i = bisect.bisect_right(st, t0) - 1
            if i >= 0:
                return [self._payloads[cam][i]] * n, [st[i]] * n
            last = self._last_frame[cam]
            if last is not None and last[0] <= t0:
                return [last[1]] * n, [last[0]] * n
        return None, None
