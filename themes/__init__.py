"""The console's themes as data: one YAML file per theme (see console/themes.py for the format).

Users add their own files in ~/.config/propeller/themes/ (or `console.theme_dirs`).
"""

from pathlib import Path

THEMES_DIR = Path(__file__).resolve().parent
