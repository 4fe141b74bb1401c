"""Chain-of-causation labels: one sentence per t0 naming the decisive cause and the ego's action.

The cause comes from the simulated controller's limiter (what decided the acceleration) and the scene
state at t0 (light colour, lead vehicle braking, road curvature, lane change); the action from the
ego's own motion around t0 (stopped, accelerating, decelerating, keeping speed). The sentence set is a
small fixed vocabulary, so the tiny model can learn it as a reasoning target.
"""
from __future__ import annotations

import numpy as np

from . import scenario as sc

# (cause, action) -> sentence. Keys are also written next to the text for analysis.
TEMPLATES = {
    ("clear_road", "keep"): "Keep lane and maintain speed since the road ahead is clear.",
    ("clear_road", "accelerate"): "Accelerate to the cruising speed since the road ahead is clear.",
    ("lead_vehicle", "follow"): "Follow the lead vehicle ahead, keeping a safe distance.",
    ("lead_vehicle", "decelerate"): "Decelerate to keep a safe distance from the slower lead vehicle.",
    ("lead_braking", "decelerate"): "Decelerate since the lead vehicle ahead is braking.",
    ("lead_stopped", "stay_stopped"): "Stay stopped behind the stopped lead vehicle.",
    ("lead_moving", "accelerate"): "Accelerate since the lead vehicle ahead is moving again.",
    ("yellow_light", "decelerate"): "Decelerate to stop at the stop line since the traffic light turned yellow.",
    ("red_light", "decelerate"): "Decelerate to stop at the stop line since the traffic light is red.",
    ("red_light", "stay_stopped"): "Stay stopped at the stop line since the traffic light is red.",
    ("green_light", "accelerate"): "Accelerate through the intersection since the traffic light turned green.",
    ("green_light", "keep"): "Proceed through the intersection since the traffic light is green.",
    ("slow_vehicle", "change_left"): "Change lanes to the left to pass the slow vehicle ahead.",
    ("passed_vehicle", "change_right"): "Change lanes to the right after passing the slow vehicle.",
    ("curve_left", "decelerate"): "Slow down for the sharp left turn ahead.",
    ("curve_right", "decelerate"): "Slow down for the sharp right turn ahead.",
    ("curve_left", "turn"): "Turn left following the road at a safe speed.",
    ("curve_right", "turn"): "Turn right following the road at a safe speed.",
}


def _lead_agent(scene: sc.Scene) -> sc.Agent | None:
    return next((a for a in scene.agents if a.role in ("lead", "slow")), None)


def label_at(scene: sc.Scene, t0_us: int) -> tuple[str, str, str]:
    """(cause, action, sentence) for the window ending at t0_us."""
    i = int(scene.index_at(t0_us))
    n = len(scene.t_us)
    ahead = min(n - 1, i + int(1.5e6 // sc.DT_US))
    v = scene.ego_v[i]
    # Mean acceleration over the next 1.5 s: what the ego is about to do, not the current jitter.
    a_future = (scene.ego_v[ahead] - v) / max((ahead - i) * sc.DT, sc.DT)
    stopped_now = v < 0.2

    lc_window = scene.lane_change[i:min(n, i + 100)]  # lane change now or within the next second
    if np.any(lc_window != 0):
        direction = lc_window[np.flatnonzero(lc_window)[0]]
        key = ("slow_vehicle", "change_left") if direction > 0 else ("passed_vehicle", "change_right")
        return (*key, TEMPLATES[key])

    limiter = scene.limiter[i]
    light = scene.light
    lead = _lead_agent(scene)
    if limiter == sc.LIGHT:
        if stopped_now:
            key = ("red_light", "stay_stopped")
        elif light.state[i] == sc.YELLOW:
            key = ("yellow_light", "decelerate")
        else:
            key = ("red_light", "decelerate")
    elif limiter == sc.LEAD:
        lead_v = lead.speed[i]
        lead_a = (lead.speed[min(n - 1, i + 20)] - lead.speed[max(0, i - 20)]) / 0.4
        if stopped_now and lead_v < 0.3:
            key = ("lead_stopped", "stay_stopped")
        elif lead_a < -1.0 or (lead.braking[i] and a_future < -0.3):
            key = ("lead_braking", "decelerate")
        elif a_future > 0.5 and lead_a > 0.3:
            key = ("lead_moving", "accelerate")
        elif a_future < -0.5:
            key = ("lead_vehicle", "decelerate")
        else:
            key = ("lead_vehicle", "follow")
    elif limiter == sc.CURVE or abs(scene.road.curvature_at(scene.ego_s[i])) > 1 / 60:
        # Sign of the sharpest curvature within 60 m tells the direction of the turn.
        s_ahead = scene.ego_s[i] + np.arange(0.0, 60.0, 2.0)
        k = scene.road.curvature_at(s_ahead)
        side = "curve_left" if k[np.argmax(np.abs(k))] > 0 else "curve_right"
        in_turn = abs(scene.road.curvature_at(scene.ego_s[i])) > 1 / 60
        key = (side, "turn" if in_turn or a_future > -0.3 else "decelerate")
    else:
        near_light = (
            light is not None
            and -5.0 < light.s_stop - (scene.ego_s[i] + sc.EGO_FRONT) < 40.0
            and light.state[i] == sc.GREEN
        )
        recently_red = light is not None and np.any(light.state[max(0, i - 300):i + 1] == sc.RED)
        if near_light:
            key = ("green_light", "accelerate" if recently_red and a_future > 0.3 else "keep")
        elif a_future > 0.3:
            key = ("clear_road", "accelerate")
        else:
            key = ("clear_road", "keep")
    return (*key, TEMPLATES[key])


def clip_labels(scene: sc.Scene, t0s_us: np.ndarray) -> list[tuple[int, str, str, str]]:
    """[(t0_us, cause, action, sentence)] for each t0."""
    return [(int(t0), *label_at(scene, int(t0))) for t0 in t0s_us]
