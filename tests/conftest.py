"""Helpers shared by the test packages (e.g. tensorboard_events) import by plain name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
