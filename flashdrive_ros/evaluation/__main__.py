"""`python -m flashdrive_ros.evaluation` = flashdrive-eval."""
import sys

from .cli import main

sys.exit(main())
