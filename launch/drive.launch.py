"""Drive node with its parameter file.

    ros2 launch flashdrive_ros drive.launch.py [model:=tiny|/path/to/ckpt] [device:=cuda] [use_sim_time:=true]
        [params_file:=/path/to/drive.yaml] [log_level:=info]

config/drive.yaml holds every parameter with its default; the launch arguments below override it.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

# (name, default, description): the launch arguments of this file.
ARGUMENTS = (
    ("params_file", PathJoinSubstitution([FindPackageShare("flashdrive_ros"), "config", "drive.yaml"]),
     "Drive node parameter file."),
    ("model", "tiny", "'tiny' (shipped checkpoint) or a checkpoint directory."),
    ("device", "cpu", "torch device: cpu, cuda, cuda:0, ..."),
    ("dtype", "float32", "float32, bfloat16 or float16."),
    ("use_sim_time", "false", "Use /clock (true when replaying a bag)."),
    ("engine_factory", "", "'module:callable' engine builder (tests / alternative backends); empty = default."),
    ("log_level", "info", "Logger level of the node."),
)


def generate_launch_description():
    cfg = {name: LaunchConfiguration(name) for name, _, _ in ARGUMENTS}
    drive = Node(
        package="flashdrive_ros",
        executable="drive_node",
        name="drive_node",
        output="screen",
        emulate_tty=True,
        additional_env={"PYTHONUNBUFFERED": "1"},
        parameters=[
            cfg["params_file"],
            {
                "model": cfg["model"],
                "device": cfg["device"],
                "dtype": cfg["dtype"],
                "engine_factory": ParameterValue(cfg["engine_factory"], value_type=str),
                "use_sim_time": ParameterValue(cfg["use_sim_time"], value_type=bool),
            },
        ],
        arguments=["--ros-args", "--log-level", cfg["log_level"]],
    )
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=desc) for name, default, desc in ARGUMENTS]
        + [drive]
    )
