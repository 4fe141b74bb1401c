"""Small generated datasets on demand, for tests and demos of every consumer."""
from __future__ import annotations

import json
import pathlib

from .writer import dataset_revision, snapshot_dir, write_dataset

_DONE = ".flashdrive_synthetic.json"


def synthetic_dataset(path, n_clips: int = 2, seconds: float = 8.5, width: int = 320, height: int = 180,
                      seed: int = 0, log=None) -> tuple[pathlib.Path, str]:
    """(cache_dir, revision) of a generated dataset under `path`, generated on first use.

    A completed generation leaves a marker in the snapshot, so calling again with the same arguments
    reuses it. Defaults make a small test set (two 8.5 s clips at 320x180) in seconds.
    """
    revision = dataset_revision(n_clips, seconds, width, height, seed)
    marker = snapshot_dir(path, revision) / _DONE
    if not marker.is_file():
        write_dataset(path, n_clips, seconds, width, height, seed, log=log or (lambda msg: None))
        marker.write_text(json.dumps(dict(n_clips=n_clips, seconds=seconds, width=width, height=height, seed=seed)))
    return pathlib.Path(path), revision
