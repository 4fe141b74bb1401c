"""Generate a synthetic PhysicalAI-AV dataset.

    python -m flashdrive_ros.data.generate --out DIR --clips N --seconds S --width W --height H --seed K

Writes a Hugging Face cache under DIR and prints the revision to pass to the devkit / WindowReader.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (a Hugging Face hub cache_dir)")
    parser.add_argument("--clips", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cache_dir, revision = synthetic_dataset(args.out, args.clips, args.seconds, args.width, args.height, args.seed,
                                            log=print)
    print(f"done in {time.perf_counter() - started:.1f} s")
    print(f"cache_dir={cache_dir}")
    print(f"revision={revision}")


if __name__ == "__main__":
    main()
