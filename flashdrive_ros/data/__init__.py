"""PhysicalAI-AV format data: synthetic scenes, renderer, dataset writer, window reader, labels.

    from flashdrive_ros.data import synthetic_dataset, WindowReader
    cache_dir, revision = synthetic_dataset(tmp_path, n_clips=2, seconds=8.5, width=320, height=180, seed=0)
    reader = WindowReader(cache_dir, revision)           # or WindowReader(PhysicalAIAVDatasetInterface(...))
    window = reader.read_window(reader.clip_ids()[0], 5_100_000)
"""
from .camera import ALPAMAYO_CAMERA_INDEX, CAMERA_NAMES
from .synthetic import synthetic_dataset
from .labels import TEMPLATES as COC_TEMPLATES
from .reader import DatasetFileError, Window, WindowReader, enable_offline_mode, open_dataset
from .scenario import SCENARIO_TYPES
from .writer import REPO_ID

__all__ = ["ALPAMAYO_CAMERA_INDEX", "CAMERA_NAMES", "COC_TEMPLATES", "DatasetFileError", "REPO_ID", "SCENARIO_TYPES",
           "Window", "WindowReader", "enable_offline_mode", "open_dataset", "synthetic_dataset"]
