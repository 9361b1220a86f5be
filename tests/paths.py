"""Where the tests find the repository (its root folder), wherever their file lives."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
