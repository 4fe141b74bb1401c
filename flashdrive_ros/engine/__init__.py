"""Inference engine (model core, pipelines). Never imports ROS."""
