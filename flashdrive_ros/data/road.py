"""Road geometry: a centreline parametrised by arc length s with a lateral offset d (left positive).

The centreline is integrated from a curvature profile on a fine grid, so curves have clothoid-like
ramps. Lanes: right-hand traffic; lanes in the ego direction lie at d < 0 (lane 0 next to the centre
line at d = -W/2, lane 1 at -3W/2), oncoming lanes at d > 0.
"""
from __future__ import annotations

import dataclasses

import numpy as np

LANE_WIDTH = 3.6  # m
SHOULDER = 0.6  # asphalt beyond the edge line, m
SIDEWALK = 2.5  # m


@dataclasses.dataclass
class Road:
    s: np.ndarray  # [n] arc length samples (uniform step)
    x: np.ndarray
    y: np.ndarray
    heading: np.ndarray  # rad, unwrapped
    curvature: np.ndarray  # 1/m, left positive
    n_same: int  # lanes in the ego direction
    n_opp: int  # oncoming lanes
    lane_width: float = LANE_WIDTH

    @classmethod
    def from_curvature(cls, s: np.ndarray, curvature: np.ndarray, n_same: int, n_opp: int) -> "Road":
        """Integrate heading and position (trapezoid rule) from a sampled curvature profile."""
        ds = np.diff(s)
        heading = np.concatenate([[0.0], np.cumsum(0.5 * (curvature[1:] + curvature[:-1]) * ds)])
        c, sn = np.cos(heading), np.sin(heading)
        x = np.concatenate([[0.0], np.cumsum(0.5 * (c[1:] + c[:-1]) * ds)])
        y = np.concatenate([[0.0], np.cumsum(0.5 * (sn[1:] + sn[:-1]) * ds)])
        return cls(s, x, y, heading, curvature, n_same, n_opp)

    def transformed(self, x0: float, y0: float, yaw0: float) -> "Road":
        """The same road expressed in a frame whose origin is (x0, y0) with heading yaw0."""
        c, sn = np.cos(yaw0), np.sin(yaw0)
        dx, dy = self.x - x0, self.y - y0
        return dataclasses.replace(
            self, x=c * dx + sn * dy, y=-sn * dx + c * dy, heading=self.heading - yaw0
        )

    def _interp(self, values: np.ndarray, s) -> np.ndarray:
        return np.interp(s, self.s, values)

    def heading_at(self, s) -> np.ndarray:
        return self._interp(self.heading, s)

    def curvature_at(self, s) -> np.ndarray:
        return self._interp(self.curvature, s)

    def point(self, s, d) -> tuple[np.ndarray, np.ndarray]:
        """World (x, y) of road coordinates (s, d); the left normal is (-sin h, cos h)."""
        h = self.heading_at(s)
        return self._interp(self.x, s) - np.asarray(d) * np.sin(h), self._interp(self.y, s) + np.asarray(d) * np.cos(h)

    def lane_center(self, lane: int) -> float:
        """d of a lane centre: lanes >= 0 are ego-direction lanes from the centre line outwards,
        lanes < 0 oncoming lanes (-1 next to the centre line)."""
        if lane >= 0:
            return -(lane + 0.5) * self.lane_width
        return (-lane - 0.5) * self.lane_width

    def lane_of(self, d: float) -> int:
        """Inverse of lane_center for a lateral offset on the road."""
        if d <= 0:
            return int(np.floor(-d / self.lane_width))
        return -int(np.floor(d / self.lane_width)) - 1

    @property
    def right_edge(self) -> float:
        return -self.n_same * self.lane_width

    @property
    def left_edge(self) -> float:
        return self.n_opp * self.lane_width


def curvature_profile(
    s: np.ndarray, knots: list[tuple[float, float]], flat_zones: list[tuple[float, float]] = ()
) -> np.ndarray:
    """Piecewise-linear curvature through (s, kappa) knots; zero inside each flat (straight) zone,
    blended over 20 m outside it so intersections sit on straight road."""
    ks, kv = zip(*knots)
    kappa = np.interp(s, ks, kv)
    for lo, hi in flat_zones:
        dist = np.maximum(lo - s, s - hi)  # < 0 inside the zone
        kappa = kappa * np.clip(dist / 20.0, 0.0, 1.0)
    return kappa
