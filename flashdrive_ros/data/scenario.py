"""Procedural driving scenarios: road, traffic light, other agents and the simulated ego motion.

A scenario is generated from (type, seed, duration) and simulated at 100 Hz. The ego follows an IDM
car-following law (Treiber et al.) towards a cruise speed limited by road curvature, lead vehicles and
a red/yellow light's stop line, plus scripted lane changes. While simulating, the controller records
which constraint decided its acceleration (`limiter`); labels.py turns that into reasoning sentences.

Frames: the world frame is the egomotion anchor frame (ego rig pose at t = 0), x forward, y left.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .road import LANE_WIDTH, SIDEWALK, Road, curvature_profile

SCENARIO_TYPES = ("cruise", "follow", "lead_brake", "red_stop", "green_go", "lane_change", "turn")

DT_US = 10_000  # simulation and egomotion step (100 Hz)
DT = DT_US * 1e-6

# Ego vehicle (a mid-size sedan). The rig origin is the rear-axle centre.
EGO_DIMENSIONS = dict(
    length=4.9, width=1.95, height=1.55, rear_axle_to_bbox_center=1.45, wheelbase=2.9, track_width=1.65
)
EGO_FRONT = EGO_DIMENSIONS["rear_axle_to_bbox_center"] + EGO_DIMENSIONS["length"] / 2  # rig x of bumper

# IDM and comfort parameters.
A_MAX, B_COMF, HEADWAY, JAM_GAP, STOP_GAP = 1.6, 2.0, 1.4, 2.5, 1.0
A_LAT = 2.0  # comfortable lateral acceleration in curves, m/s^2
LANE_CHANGE_S = 4.0

# Limiter codes recorded per simulation step.
FREE, CURVE, LEAD, LIGHT = "free", "curve", "lead", "light"
GREEN, YELLOW, RED = 0, 1, 2

_CAR_COLORS = [(180, 30, 30), (30, 60, 160), (200, 200, 205), (40, 40, 45), (230, 230, 230),
               (30, 110, 60), (200, 150, 30), (110, 110, 120)]


@dataclasses.dataclass
class Agent:
    """Another road user; the pose arrays share the scene's 100 Hz time grid."""

    role: str  # lead, slow, oncoming, cross, pedestrian
    kind: str  # car, truck, pedestrian
    length: float
    width: float
    height: float
    color: tuple[int, int, int]
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    speed: np.ndarray
    braking: np.ndarray  # bool, brake lights on


@dataclasses.dataclass
class TrafficLight:
    s_stop: float  # stop line position along the road (m)
    state: np.ndarray  # int8 per time step: GREEN, YELLOW, RED


@dataclasses.dataclass
class Scene:
    scenario: str
    seed: int
    t_us: np.ndarray  # [n] 0 .. duration at 100 Hz
    road: Road
    ego_s: np.ndarray
    ego_d: np.ndarray
    ego_v: np.ndarray
    ego_a: np.ndarray
    ego_x: np.ndarray
    ego_y: np.ndarray
    ego_yaw: np.ndarray
    limiter: np.ndarray  # object array of limiter codes
    lane_change: np.ndarray  # int8: +1 changing left, -1 changing right, 0 none
    agents: list[Agent]
    light: TrafficLight | None
    cross_road_s: float | None  # centre of the crossing road along the main road

    @property
    def duration_us(self) -> int:
        return int(self.t_us[-1])

    def index_at(self, t_us) -> np.ndarray:
        """Nearest simulation step at or before t_us."""
        return np.clip(np.asarray(t_us) // DT_US, 0, len(self.t_us) - 1).astype(np.int64)

    def ego_pose(self, t_us) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ego (x, y, yaw) in the anchor frame, linearly interpolated between 100 Hz samples."""
        return (np.interp(t_us, self.t_us, self.ego_x), np.interp(t_us, self.t_us, self.ego_y),
                np.interp(t_us, self.t_us, self.ego_yaw))

    def agent_pose(self, agent: Agent, t_us) -> tuple[float, float, float]:
        return (float(np.interp(t_us, self.t_us, agent.x)), float(np.interp(t_us, self.t_us, agent.y)),
                float(np.interp(t_us, self.t_us, agent.yaw)))


def _smoothstep5(u):
    u = np.clip(u, 0.0, 1.0)
    return u**3 * (10 - 15 * u + 6 * u**2)


def _scripted_speed(n: int, v0: float, events: list[tuple[float, float, float]]) -> np.ndarray:
    """Speed at each step from v0 through events (t_start s, target m/s, |accel| m/s^2), in order."""
    v = np.empty(n)
    cur, target, rate, ei = v0, v0, 0.0, 0
    for i in range(n):
        t = i * DT
        while ei < len(events) and t >= events[ei][0]:
            _, target, rate = events[ei]
            ei += 1
        cur = cur + np.clip(target - cur, -rate * DT, rate * DT)
        v[i] = cur
    return v


def _road_agent(road: Road, role, kind, dims, color, s, d, v, braking) -> Agent:
    """Agent moving along the road at offset d; heading follows the road (reversed for oncoming)."""
    x, y = road.point(s, d)
    yaw = road.heading_at(s) + (np.pi if role in ("oncoming",) else 0.0)
    if role == "pedestrian":
        yaw = road.heading_at(s) + np.where(np.gradient(s) < 0, np.pi, 0.0)
    return Agent(role, kind, *dims, color, np.asarray(x), np.asarray(y), np.asarray(yaw),
                 np.abs(np.asarray(v, dtype=float)) * np.ones_like(x), np.asarray(braking))


def build_scene(scenario: str, seed: int, duration_s: float) -> Scene:
    """Generate and simulate one clip. Deterministic in (scenario, seed, duration_s)."""
    if scenario not in SCENARIO_TYPES:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIO_TYPES}")
    if not 2.0 <= duration_s <= 120.0:
        raise ValueError(f"clip duration must be within [2, 120] s, got {duration_s}")
    rng = np.random.default_rng([seed, SCENARIO_TYPES.index(scenario)])
    n = int(round(duration_s * 1e6 / DT_US)) + 1
    t = np.arange(n) * DT
    S = duration_s

    v_set = float(rng.uniform(10.0, 15.0))
    n_same = 2 if scenario == "lane_change" else int(rng.integers(1, 3))
    n_opp = int(rng.integers(1, 3))
    ego_lane = 1 if scenario == "lane_change" else 0
    ego_v0 = v_set * float(rng.uniform(0.6, 0.95)) if scenario == "cruise" else v_set * 0.9

    # --- road: gentle random curves, a sharp 90-degree turn for "turn", straight at intersections.
    s_start, s_end = -120.0, v_set * S * 1.3 + 260.0
    knots = [(s_start, 0.0)]
    pos = 20.0
    turn = None
    if scenario == "turn":
        radius = float(rng.uniform(18.0, 28.0))
        side = float(rng.choice([-1.0, 1.0]))
        k = side / radius
        ramp = 10.0
        arc = (np.pi / 2 - abs(k) * ramp) / abs(k)  # ramps contribute kappa*ramp of heading in total
        s_turn = v_set * S * 0.45 + 20.0
        knots += [(s_turn, 0.0), (s_turn + ramp, k), (s_turn + ramp + arc, k), (s_turn + 2 * ramp + arc, 0.0)]
        turn = (s_turn, s_turn + 2 * ramp + arc)
        pos = turn[1] + 40.0
    while pos < s_end:
        straight = float(rng.uniform(30.0, 90.0))
        length = float(rng.uniform(40.0, 100.0))
        k = float(rng.choice([-1, 1]) * rng.uniform(1 / 450, 1 / 180))
        knots += [(pos + straight, 0.0), (pos + straight + 20, k), (pos + straight + 20 + length, k),
                  (pos + straight + 40 + length, 0.0)]
        pos += straight + 40 + length
    knots.append((max(pos, s_end) + 100.0, 0.0))

    light = None
    s_stop = None
    ego_s0 = 0.0
    if scenario in ("red_stop", "green_go"):
        s_stop = v_set * S * 0.35 + EGO_FRONT if scenario == "red_stop" else 25.0
        if scenario == "green_go":
            ego_s0 = s_stop - EGO_FRONT - STOP_GAP
            ego_v0 = 0.0
    # Intersections sit on straight road.
    flat = [(s_stop - 90.0, s_stop + 60.0)] if s_stop is not None else []
    s_grid = np.arange(s_start, max(pos, s_end) + 100.0, 0.1)
    kappa = curvature_profile(s_grid, knots, flat)
    road = Road.from_curvature(s_grid, kappa, n_same, n_opp)
    ego_d0 = road.lane_center(ego_lane)
    x0, y0 = road.point(ego_s0, ego_d0)
    road = road.transformed(float(x0), float(y0), float(road.heading_at(ego_s0)))

    # --- scripted agents on the main road (lead/slow vehicles move independently of the ego).
    agents: list[Agent] = []
    lead = None  # (s array, lane, length, braking)
    if scenario in ("follow", "lead_brake", "lane_change"):
        if scenario == "follow":
            v_lead0 = v_set * float(rng.uniform(0.65, 0.8))
            v_lead = v_lead0 + 0.8 * np.sin(2 * np.pi * t / float(rng.uniform(8, 12)))
            gap0 = JAM_GAP + v_lead0 * HEADWAY * 1.3
            ego_v0 = v_lead0
        elif scenario == "lead_brake":
            v_lead0 = v_set * 0.85
            tb = S * float(rng.uniform(0.35, 0.45))
            decel = float(rng.uniform(3.0, 4.5))
            stop_hold = float(rng.uniform(3.5, 5.0))
            v_lead = _scripted_speed(n, v_lead0, [(tb, 0.0, decel), (tb + v_lead0 / decel + stop_hold, v_lead0, 1.5)])
            gap0 = JAM_GAP + v_lead0 * HEADWAY * 1.2
            ego_v0 = v_lead0
        else:  # lane_change: a slow vehicle the ego will pass
            v_lead = np.full(n, v_set * float(rng.uniform(0.4, 0.5)))
            gap0 = float(rng.uniform(22.0, 32.0))
        dims = (4.6, 1.9, 1.5) if rng.random() < 0.75 else (8.0, 2.5, 3.2)
        kind = "car" if dims[0] < 5 else "truck"
        s_lead = ego_s0 + EGO_FRONT + gap0 + dims[0] / 2 + np.concatenate([[0.0], np.cumsum(v_lead[:-1] * DT)])
        braking = np.gradient(v_lead, DT) < -0.5
        lead = (s_lead, ego_lane, dims[0], v_lead)
        role = "slow" if scenario == "lane_change" else "lead"
        agents.append(_road_agent(road, role, kind, dims, _CAR_COLORS[int(rng.integers(len(_CAR_COLORS)))],
                                  s_lead, road.lane_center(ego_lane), v_lead, braking))

    light_state = None
    if s_stop is not None:
        light_state = np.full(n, GREEN, dtype=np.int8)
        if scenario == "green_go":
            t_green = S * float(rng.uniform(0.3, 0.45))
            light_state[t < t_green] = RED
        light = TrafficLight(s_stop, light_state)

    # --- ego simulation.
    ego_s = np.empty(n); ego_v = np.empty(n); ego_a = np.empty(n); ego_d = np.empty(n)
    limiter = np.empty(n, dtype=object); lane_change = np.zeros(n, dtype=np.int8)
    s, v, a = ego_s0, ego_v0, 0.0
    d_from = d_to = ego_d0
    lc_start = None
    lc_count = 0
    red_until = None
    for i in range(n):
        ti = t[i]
        # Lane-change progress (scripted quintic in time).
        if lc_start is not None:
            u = (ti - lc_start) / LANE_CHANGE_S
            d = d_from + (d_to - d_from) * _smoothstep5(u)
            if u >= 1.0:
                lc_start, d_from, d = None, d_to, d_to
        else:
            d = d_from
        lane_change[i] = 0 if lc_start is None else int(np.sign(d_to - d_from))

        # Desired speed: cruise, limited by curvature ahead (decelerate comfortably to each point).
        ahead = s + np.arange(0.0, 90.0, 2.0)
        v_curve = np.sqrt(A_LAT / np.maximum(np.abs(road.curvature_at(ahead)), 1e-4))
        v0 = min(v_set, float(np.min(np.sqrt(v_curve**2 + 2 * 1.2 * (ahead - s)))))
        free = A_MAX * (1 - (v / v0) ** 4)
        obstacles = []  # (interaction term, code)
        if lead is not None:
            s_lead, lead_lane, lead_len, v_lead = lead
            occupied = {road.lane_of(d_from), road.lane_of(d_to), road.lane_of(d)}
            if lead_lane in occupied and s_lead[i] > s:
                gap = s_lead[i] - lead_len / 2 - (s + EGO_FRONT)
                obstacles.append((_interaction(v, v - v_lead[i], gap, JAM_GAP), LEAD, gap - JAM_GAP,
                                  v_lead[i] < 0.3))
        if light is not None:
            state = light.state[i]
            gap = light.s_stop - (s + EGO_FRONT)
            # Red or yellow: stop unless already past the line or unable to stop comfortably on yellow.
            if state != GREEN and gap > -0.5 and (state == RED or gap > v * v / (2 * 4.0)):
                obstacles.append((_interaction(v, v, gap, STOP_GAP), LIGHT, gap - STOP_GAP, True))
        inter, code, room, standing = max(obstacles, default=(0.0, FREE, np.inf, False))
        a_cmd = max(free - inter, -7.0)
        # IDM creeps towards a stop; brake to the kinematic stopping deceleration once it is
        # significant, and hold a standstill behind an obstacle instead of inching forward.
        b_stop = v * v / (2 * max(room, 0.05))
        if standing and v < 3.0 and room < 3.0 * v + 1.0:
            a_cmd = min(a_cmd, -max(b_stop, 1.0))
        if code != FREE and v < 0.05 and a_cmd < 0.6:
            a_cmd = -1.0
        limiter[i] = code if inter > 0.25 else (CURVE if v0 < v_set - 0.3 and free < 0.3 else FREE)

        # Red-light trigger for "red_stop": the light turns yellow when the ego is a comfortable
        # stopping distance away, stays yellow 2.5 s, red for a while, then green again.
        if scenario == "red_stop" and red_until is None:
            gap = light.s_stop - (s + EGO_FRONT)
            if gap <= v * v / (2 * 1.6) + 8.0:
                t_y = ti
                red_until = t_y + 2.5 + v / 1.5 + S * float(rng.uniform(0.1, 0.15))
                light.state[(t >= t_y) & (t < t_y + 2.5)] = YELLOW
                light.state[(t >= t_y + 2.5) & (t < red_until)] = RED

        # Lane change: start when closing on the slow vehicle, return after passing it.
        if scenario == "lane_change" and lc_start is None and v > 3.0:
            s_lead, lead_lane, lead_len, v_lead = lead
            gap = s_lead[i] - lead_len / 2 - (s + EGO_FRONT)
            if lc_count == 0 and gap < v * 2.2 + 6.0:
                lc_start, d_to, lc_count = ti, road.lane_center(ego_lane - 1), 1
            elif lc_count == 1 and (s - EGO_DIMENSIONS["length"]) > s_lead[i] + lead_len / 2 + 8.0:
                lc_start, d_to, lc_count = ti, road.lane_center(ego_lane), 2
            if lc_start is not None:
                lane_change[i] = int(np.sign(d_to - d_from))

        ego_s[i], ego_v[i], ego_a[i], ego_d[i] = s, v, a, d
        # First-order actuator lag smooths steps in the commanded acceleration.
        a = a + (a_cmd - a) * min(1.0, DT / 0.3)
        v_next = max(0.0, v + a * DT)
        if v_next == 0.0:  # standing still: no residual braking (it would delay the start)
            a = max(a, 0.0)
        s += 0.5 * (v + v_next) * DT
        v = v_next

    # --- ego pose in the anchor frame.
    ex, ey = road.point(ego_s, ego_d)
    d_dot = np.gradient(ego_d, DT)
    k_road = road.curvature_at(ego_s)
    eyaw = road.heading_at(ego_s) + np.arctan2(d_dot, np.maximum(ego_v, 1e-3) * (1 - k_road * ego_d))

    # --- background traffic: oncoming cars, pedestrians on the sidewalks, cross traffic.
    for _ in range(int(rng.integers(2, 6))):
        vo = float(rng.uniform(8.0, 14.0))
        s0 = ego_s0 + float(rng.uniform(20.0, v_set * S + 150.0))
        lane = -1 - int(rng.integers(0, n_opp))
        so = s0 - vo * t
        agents.append(_road_agent(road, "oncoming", "car", (4.6, 1.9, 1.5),
                                  _CAR_COLORS[int(rng.integers(len(_CAR_COLORS)))], so,
                                  road.lane_center(lane), vo, np.zeros(n, bool)))
    for _ in range(int(rng.integers(2, 6))):
        vp = float(rng.uniform(1.0, 1.6)) * float(rng.choice([-1, 1]))
        side = float(rng.choice([-1, 1]))
        dp = (road.left_edge + 0.6 + SIDEWALK / 2) if side > 0 else (road.right_edge - 0.6 - SIDEWALK / 2)
        sp = ego_s0 + float(rng.uniform(5.0, v_set * S + 60.0)) + vp * t
        color = tuple(int(c) for c in rng.integers(30, 230, size=3))
        agents.append(_road_agent(road, "pedestrian", "pedestrian", (0.5, 0.6, 1.75), color, sp, dp,
                                  vp, np.zeros(n, bool)))
    cross_s = None
    if light is not None:
        cross_s = light.s_stop + 4.5 + 3.0 + 1.5 * LANE_WIDTH  # stop line, crosswalk, then the road
        red = np.flatnonzero(light.state == RED)
        if len(red):
            t_red0, t_red1 = t[red[0]], t[red[-1]]
            cx, cy = road.point(cross_s, 0.0)
            h = float(road.heading_at(cross_s))
            for k in range(int(max(1, (t_red1 - t_red0) // 3))):
                tc = t_red0 + 1.0 + k * 3.0 + float(rng.uniform(0, 1))
                if tc > t_red1 - 1.5:
                    break
                direction = 1.0 if k % 2 == 0 else -1.0
                vc = float(rng.uniform(9.0, 12.0))
                lat = direction * LANE_WIDTH / 2  # drive on the right of the crossing road
                along = direction * vc * (t - tc)  # position along the crossing road direction (left of ego road)
                ux, uy = -np.sin(h), np.cos(h)  # crossing road direction
                px = cx + along * ux + lat * np.cos(h)
                py = cy + along * uy + lat * np.sin(h)
                yaw = np.full(n, h + (np.pi / 2 if direction > 0 else -np.pi / 2))
                agents.append(Agent("cross", "car", 4.6, 1.9, 1.5, _CAR_COLORS[int(rng.integers(len(_CAR_COLORS)))],
                                    px, py, yaw, np.full(n, vc), np.zeros(n, bool)))

    t_us = np.arange(n, dtype=np.int64) * DT_US
    return Scene(scenario, seed, t_us, road, ego_s, ego_d, ego_v, ego_a, ex, ey, eyaw, limiter,
                 lane_change, agents, light, cross_s)


def _interaction(v: float, dv: float, gap: float, jam_gap: float) -> float:
    """IDM interaction (braking) term for an obstacle `gap` metres ahead closing at `dv` m/s."""
    s_star = jam_gap + max(0.0, v * HEADWAY + v * dv / (2 * np.sqrt(A_MAX * B_COMF)))
    return A_MAX * (s_star / max(gap, 0.2)) ** 2
