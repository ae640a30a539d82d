"""Themes are data: YAML files turned into Textual `Theme` objects.

House themes ship in the `themes/` package; users drop more files into the config directory's
`themes/` (or `console.theme_dirs`). A file holds one theme:

```yaml
name: my-theme
dark: true
primary: "#4EA8DE"          # required; the other colours default from it
secondary: ..., accent: ..., success: ..., warning: ..., error: ...
foreground: ..., background: ..., surface: ..., panel: ...
variables: {footer-key-foreground: "#F4A259"}
```

Textual's `ansi-dark` and `ansi-light` stay registered: they draw with the terminal's own palette.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

from themes import THEMES_DIR

log = logging.getLogger(__name__)

# What `:theme terminal` means: use the terminal's colours.
ALIASES = {"terminal": "ansi-dark", "terminal-dark": "ansi-dark", "terminal-light": "ansi-light",
           "dark": "propeller-dark", "light": "propeller-light"}
TERMINAL_THEMES = ("ansi-dark", "ansi-light")
_COLOUR_FIELDS = ("primary", "secondary", "accent", "success", "warning", "error", "foreground", "background",
                  "surface", "panel", "boost")


class ThemeFileError(ValueError):
    """A theme file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class LoadedThemes:
    themes: list[Theme]
    problems: list[str]


def theme_from_mapping(doc: Any, source: str) -> Theme:
    if not isinstance(doc, dict):
        raise ThemeFileError(f"{source}: a theme file must be a mapping with at least name and primary")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ThemeFileError(f"{source}: 'name' is missing")
    if "primary" not in doc:
        raise ThemeFileError(f"{source}: 'primary' is missing (every other colour defaults from it)")
    values: dict[str, Any] = {"name": name.strip()}
    for key in _COLOUR_FIELDS:
        if doc.get(key) is None:
            continue
        text = str(doc[key])
        try:
            Color.parse(text)
        except ColorParseError:
            raise ThemeFileError(f"{source}: {key}: {text!r} is not a colour (use #RRGGBB or a colour name)") from None
        values[key] = text
    variables = doc.get("variables") or {}
    if not isinstance(variables, dict):
        raise ThemeFileError(f"{source}: 'variables' must be a mapping of variable name to value")
    values["variables"] = {str(k): str(v) for k, v in variables.items()}
    values["dark"] = bool(doc.get("dark", True))
    return Theme(**values)


def load_theme_file(path: Path) -> Theme:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ThemeFileError(f"{path}: cannot be read as YAML ({exc})") from None
    return theme_from_mapping(doc, str(path))


def load_themes(user_dirs: Iterable[Path] = ()) -> LoadedThemes:
    """House themes first, then user themes (a user theme with a house name replaces it)."""
    themes: dict[str, Theme] = {}
    problems: list[str] = []
    for directory in (THEMES_DIR, *user_dirs):
        if not directory.is_dir():
            continue
        for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
            try:
                theme = load_theme_file(path)
            except ThemeFileError as exc:
                problems.append(str(exc))
                continue
            themes[theme.name] = theme
    return LoadedThemes(list(themes.values()), problems)


def resolve_name(name: str) -> str:
    return ALIASES.get(name.strip().lower(), name.strip())
