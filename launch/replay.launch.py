"""Replay a clip bag into the drive node on simulated time.

    ros2 launch flashdrive_ros replay.launch.py bag:=/data/clip_bag [rate:=1.0] [loop:=true]
        [start_offset:=0.0] [delay:=2.0] [model:=tiny] [device:=cuda] ...

Starts replay_node (the /clock source, wall time) and drive.launch.py with use_sim_time:=true.
Make bags with: ros2 run flashdrive_ros clip_to_bag --dataset <hf cache> --clip <id> --out <bag>
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, IncludeLaunchDescription, RegisterEventHandler
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

# (name, default, description). Replay arguments mirror `ros2 bag play`; the rest go to the drive node.
REPLAY_ARGUMENTS = (
    ("bag", None, "Bag directory written by clip_to_bag (required)."),
    ("rate", "1.0", "Playback rate factor."),
    ("loop", "false", "Loop the bag (a clip boundary is signalled on every pass)."),
    ("start_offset", "0.0", "Seconds skipped at the start of each pass."),
    ("delay", "2.0", "Seconds before the first message (drive node start-up and discovery)."),
    ("clock_frequency", "100.0", "Hz of /clock between messages."),
    ("shutdown_when_done", "true", "Stop the whole launch when the replay finishes (not looping)."),
)
# Also accepted (declared in drive.launch.py): model, device, dtype, params_file, engine_factory, log_level.


def generate_launch_description():
    cfg = {name: LaunchConfiguration(name) for name, _, _ in REPLAY_ARGUMENTS}
    declared = [DeclareLaunchArgument(name, description=desc, **({} if default is None else {"default_value": default}))
                for name, default, desc in REPLAY_ARGUMENTS]
    replay = Node(
        package="flashdrive_ros",
        executable="replay_node",
        name="replay_node",
        output="screen",
        emulate_tty=True,
        additional_env={"PYTHONUNBUFFERED": "1"},
        parameters=[{
            "bags": ParameterValue(cfg["bag"], value_type=str),
            "rate": ParameterValue(cfg["rate"], value_type=float),
            "loop": ParameterValue(cfg["loop"], value_type=bool),
            "start_offset": ParameterValue(cfg["start_offset"], value_type=float),
            "delay": ParameterValue(cfg["delay"], value_type=float),
            "clock_frequency": ParameterValue(cfg["clock_frequency"], value_type=float),
            "use_sim_time": False,   # the replay node is the clock source
        }],
    )
    drive = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([FindPackageShare("flashdrive_ros"), "launch",
                                                            "drive.launch.py"])),
        # Only use_sim_time is forced; model:=, device:=, ... given to this launch reach drive.launch.py
        # through the shared launch context.
        launch_arguments=[("use_sim_time", "true")],
    )
    stop_when_done = RegisterEventHandler(
        OnProcessExit(target_action=replay, on_exit=[EmitEvent(event=Shutdown(reason="replay finished"))]),
        condition=IfCondition(cfg["shutdown_when_done"]),
    )
    return LaunchDescription(declared + [replay, drive, stop_when_done])

