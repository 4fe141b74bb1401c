"""Scenes, camera models and labels, without rendering (fast)."""
import numpy as np
import pandas as pd
import pytest
from physical_ai_av.utils.camera_models import FThetaCameraModel

from flashdrive_ros.data import labels, scenario as sc
from flashdrive_ros.data.camera import CAMERA_NAMES, default_rig, ftheta_for_fov


def test_ftheta_projection_matches_the_devkit_model():
    rig = default_rig(640, 360)
    rng = np.random.default_rng(0)
    for cam in rig.values():
        devkit = FThetaCameraModel.from_camera_row(pd.Series(cam.intrinsics.to_row()))
        rays = rng.normal(size=(200, 3))
        rays[:, 2] = np.abs(rays[:, 2]) + 0.5
        np.testing.assert_allclose(cam.intrinsics.ray_to_pixel(rays), devkit.ray2pixel(rays), atol=1e-9)
        # pixel -> ray inverts the forward model exactly; the devkit's fitted bw_poly to a fraction of a pixel.
        pixels = rng.uniform([0, 0], [639, 359], size=(200, 2))
        np.testing.assert_allclose(cam.intrinsics.ray_to_pixel(cam.intrinsics.pixel_to_ray(pixels)), pixels, atol=1e-6)
        np.testing.assert_allclose(devkit.ray2pixel(devkit.pixel2ray(pixels)), pixels, atol=0.5)


def test_rig_cameras_look_where_they_are_named():
    rig = default_rig(320, 180)
    assert tuple(rig) == CAMERA_NAMES
    axis = {name: cam.rotation[:, 2] for name, cam in rig.items()}  # optical axis in the rig frame
    assert axis["camera_front_wide_120fov"][0] > 0.99
    assert axis["camera_cross_left_120fov"][1] > 0.8  # looks left
    assert axis["camera_cross_right_120fov"][1] < -0.8  # looks right
    # A point 20 m straight ahead on the ground lands below the image centre of the front camera.
    pixel, visible = rig["camera_front_wide_120fov"].project(np.array([20.0, 0.0, 0.0]))
    assert visible and abs(pixel[0] - 160) < 3 and pixel[1] > 90


def test_ftheta_rejects_bad_input():
    with pytest.raises(ValueError, match="resolution"):
        ftheta_for_fov(120, 0, 180)
    with pytest.raises(ValueError, match="FOV"):
        ftheta_for_fov(500, 320, 180)


def test_scenes_are_deterministic_from_the_seed():
    a, b = sc.build_scene("follow", 7, 10.0), sc.build_scene("follow", 7, 10.0)
    c = sc.build_scene("follow", 8, 10.0)
    np.testing.assert_array_equal(a.ego_x, b.ego_x)
    np.testing.assert_array_equal(a.agents[0].x, b.agents[0].x)
    assert not np.array_equal(a.ego_x, c.ego_x)


def test_scene_starts_at_the_anchor_and_is_sampled_at_100hz():
    scene = sc.build_scene("cruise", 1, 10.0)
    assert scene.ego_x[0] == pytest.approx(0, abs=1e-9) and scene.ego_y[0] == pytest.approx(0, abs=1e-9)
    assert scene.ego_yaw[0] == pytest.approx(0, abs=1e-9)
    assert np.all(np.diff(scene.t_us) == 10_000) and scene.t_us[-1] == 10_000_000
    # Positions follow the simulated speed.
    step = np.hypot(np.diff(scene.ego_x), np.diff(scene.ego_y))
    np.testing.assert_allclose(step / 0.01, 0.5 * (scene.ego_v[1:] + scene.ego_v[:-1]), rtol=0.02, atol=0.02)


def test_red_light_stops_the_ego_before_the_stop_line_and_green_releases_it():
    scene = sc.build_scene("red_stop", 3, 20.0)
    front = scene.ego_s + sc.EGO_FRONT
    red = scene.light.state == sc.RED
    assert red.any()
    assert np.all(front[red] < scene.light.s_stop)  # never over the line while red
    assert scene.ego_v[red].min() < 0.05  # stopped during red
    green_again = np.flatnonzero(red)[-1] + 1
    assert green_again < len(scene.t_us) - 200 and scene.ego_v[-1] > 1.0  # goes on green


def test_lead_vehicle_braking_never_causes_a_collision():
    for seed in range(4):
        scene = sc.build_scene("lead_brake", seed, 20.0)
        lead = next(a for a in scene.agents if a.role == "lead")
        gap = np.hypot(lead.x - scene.ego_x, lead.y - scene.ego_y) - lead.length / 2 - sc.EGO_FRONT
        assert gap.min() > 1.0
        assert lead.braking.any() and scene.ego_v.min() < 1.0


def test_lane_change_moves_one_lane_left_and_turn_turns_ninety_degrees():
    scene = sc.build_scene("lane_change", 2, 20.0)
    assert scene.ego_d[0] == pytest.approx(scene.road.lane_center(1))
    assert scene.ego_d.max() == pytest.approx(scene.road.lane_center(0), abs=0.01)
    assert (scene.lane_change > 0).any()
    turn = sc.build_scene("turn", 2, 20.0)
    assert abs(abs(turn.ego_yaw[-1] - turn.ego_yaw[0]) - np.pi / 2) < 0.25
    assert turn.ego_v.min() < 0.8 * turn.ego_v.max()  # slowed for the turn


def test_unknown_scenario_and_bad_duration_are_rejected():
    with pytest.raises(ValueError, match="unknown scenario"):
        sc.build_scene("fly", 0, 10.0)
    with pytest.raises(ValueError, match="duration"):
        sc.build_scene("cruise", 0, 0.5)


def test_labels_come_from_a_small_vocabulary_and_name_the_scene_cause():
    assert 10 <= len(labels.TEMPLATES) <= 20
    t0s = np.arange(1_700_000, 13_700_000, 100_000)
    seen = {}
    for kind in sc.SCENARIO_TYPES:
        rows = labels.clip_labels(sc.build_scene(kind, 5, 20.0), t0s)
        seen[kind] = {text for *_, text in rows}
        assert seen[kind] <= set(labels.TEMPLATES.values())
    assert "Decelerate since the lead vehicle ahead is braking." in seen["lead_brake"]
    assert "Stay stopped at the stop line since the traffic light is red." in seen["green_go"]
    assert any("turned green" in s for s in seen["green_go"])
    assert any("red" in s and s.startswith("Decelerate") for s in seen["red_stop"])
    assert any("Change lanes to the left" in s for s in seen["lane_change"])
    assert any("turn" in s for s in seen["turn"])
    assert seen["cruise"] <= {labels.TEMPLATES[("clear_road", "keep")], labels.TEMPLATES[("clear_road", "accelerate")]}
