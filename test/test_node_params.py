"""Drive node parameters: one table in params.py, mirrored exactly by config/drive.yaml; invalid values
are refused with the parameter's name."""

from pathlib import Path

import pytest
import yaml

from flashdrive_ros.nodes.params import DEFAULTS, DESCRIPTIONS, PARAMETERS, DriveParams

YAML = Path(__file__).resolve().parents[1] / "config" / "drive.yaml"


def yaml_params():
    return yaml.safe_load(YAML.read_text())["/**"]["ros__parameters"]


def test_yaml_declares_exactly_the_node_parameters_with_the_same_types_and_defaults():
    y = yaml_params()
    assert set(y) == set(DEFAULTS)
    for name, value in y.items():
        # rclpy refuses an override whose type differs from the declared default (e.g. 100 for 100.0)
        assert type(value) is type(DEFAULTS[name]), name
        assert value == DEFAULTS[name], name


def test_every_parameter_has_a_description_and_a_unique_name():
    names = [p[0] for p in PARAMETERS]
    assert len(names) == len(set(names))
    assert all(len(DESCRIPTIONS[n]) > 10 for n in names)


def test_defaults_validate_and_map_to_engine_arguments():
    p = DriveParams.from_dict({})
    kw = p.engine_kwargs()
    assert kw["device"] == "cpu" and kw["dtype"] == "float32" and kw["num_samples"] == 1
    assert kw["streaming"] is True and kw["flow_schedule"] == "uniform"
    assert "cuda_graphs" not in kw
    assert DriveParams.from_dict({"cuda_graphs": True}).engine_kwargs()["cuda_graphs"] is True
    assert not any(k.startswith("action_draft") for k in kw)  # the lossy action draft is off by default
    on = DriveParams.from_dict({"action_draft_m": 0.5, "action_draft_max_reuse": 2}).engine_kwargs()
    assert (on["action_draft_m"], on["action_draft_check_time"], on["action_draft_max_reuse"]) == (0.5, 0.5, 2)


@pytest.mark.parametrize("override,name", [
    ({"camera_topics": ["/a", "/b", "/c"]}, "camera_topics"),
    ({"missing_camera_policy": "zeros"}, "missing_camera_policy"),
    ({"anchor_camera": 4}, "anchor_camera"),
    ({"image_transport": "theora"}, "image_transport"),
    ({"flow_schedule": "fast"}, "flow_schedule"),
    ({"num_samples": 0}, "num_samples"),
    ({"dtype": "int8"}, "dtype"),
    ({"action_draft_m": -0.1}, "action_draft_m"),
    ({"action_draft_check_time": 1.0}, "action_draft_check_time"),
    ({"action_draft_max_reuse": 0}, "action_draft_max_reuse"),
])
def test_invalid_values_name_the_parameter(override, name):
    with pytest.raises(ValueError, match=name):
        DriveParams.from_dict(override)


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        DriveParams.from_dict({"camera_topic": "/x"})


def test_yaml_file_is_the_rendered_table():
    from flashdrive_ros.nodes.params import render_yaml
    assert YAML.read_text() == render_yaml(), "regenerate: python -m flashdrive_ros.nodes.params > config/drive.yaml"
