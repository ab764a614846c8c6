"""README stays true: its flag table is `pagedserve serve --help`, its links point inside the
repository, and its Layout names the folders that exist."""

import argparse
import re
from pathlib import Path

from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _flag_rows() -> dict[str, tuple[str, str]]:
    """flag -> (default cell, meaning cell) from the table under "### Flags"."""
    section = README.split("### Flags", 1)[1]
    table = section[section.index("| flag |"):].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("flag", "---"):
            continue
        for flag in re.findall(r"`(--[\w-]+|MODEL)`", cells[0]):
            rows[flag] = (cells[1], cells[2])
    return rows


def test_flag_table_matches_help():
    rows = _flag_rows()
    actions = [a for a in _serve_parser()._actions if a.dest != "help"]
    flags = {"MODEL" if not a.option_strings else a.option_strings[0]: a for a in actions}
    # BooleanOptionalAction's --no- form sits in the same row
    assert {f for f in rows if not (f.startswith("--no-") and "--" + f[5:] in rows)} == \
        set(flags), "README vs --help"
    for flag, action in flags.items():
        default, meaning = rows[flag]
        for choice in action.choices or ():
            assert f"`{choice}`" in default + meaning, (flag, choice)
        if isinstance(action.default, (int, float, str)) and not isinstance(action.default, bool):
            assert str(action.default) in default, (flag, action.default, default)
        elif action.default is True:
            assert default == "on", flag
        elif action.default is False:
            assert default == "off", flag


def test_links_stay_inside_the_repository():
    for target in re.findall(r"`((?:shared/|\.\./)[^`]*)`|\]\(([^)]+)\)", README):
        path = next(t for t in target if t)
        assert not path.startswith(("shared/", "../")), path
        if not path.startswith(("http://", "https://", "#")):
            assert (ROOT / path).exists(), path


def test_layout_names_the_floors():
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for folder in ("engine/core/", "engine/model/", "engine/executor/", "server/", "cuda/"):
        assert folder in layout and (ROOT / folder).is_dir(), folder
    for module in re.findall(r"\b(\w+\.py)\b", layout):
        assert list(ROOT.rglob(module)), module
