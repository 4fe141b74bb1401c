"""Generate a synthetic PhysicalAI-AV dataset.

    python -m flashdrive_ros.data.generate --out DIR --clips N --seconds S --width W --height H --seed K

Writes a Hugging Face cache under DIR and prints the revision to pass to the devkit / WindowReader.
"""
from __future__ import annotations

import argparse
import time

from .synthetic import synthetic_dataset


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
