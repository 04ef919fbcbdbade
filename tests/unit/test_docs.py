"""The README says what the program does: its error table is ``errors.ROW_ERROR_CODES``, its exit
table is the CLI's ``EXIT_*`` codes, its CLI synopsis names exactly the parser's flags, and its
install lines name extras and make targets that exist. (tests/e2e/test_docs_commands.py runs the
documented commands.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from similarity import cli
from similarity.errors import ROW_ERROR_CODES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CLI_DOC = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^#{1,3} ", text[start + len(heading) :], flags=re.M)
    return text[start : start + len(heading) + (nxt.start() if nxt else len(text))]


def _table_first_column(section: str) -> list[str]:
    return [line.split("|")[1].strip() for line in section.splitlines() if re.match(r"\|\s*[`\d]", line)]


def test_error_table_is_the_row_error_codes() -> None:
    cells = _table_first_column(_section(README, "### Error codes"))
    codes = {code for cell in cells for code in re.findall(r"`([^`]+)`", cell)}
    assert codes == set(ROW_ERROR_CODES)


def test_exit_table_is_the_cli_exit_codes() -> None:
    documented = {int(c) for c in _table_first_column(_section(README, "## CLI"))}
    actual = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert documented == actual
    in_depth = {int(c) for c in _table_first_column(_section(CLI_DOC, "## Exit status"))}
    assert in_depth == actual


def _parser_flags(command: str) -> set[str]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = set()
    for action in sub.choices[command]._actions:
        flags.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
    return flags


def test_cli_synopsis_names_exactly_the_flags() -> None:
    synopsis = _section(README, "## CLI").split("```")[1]
    score = synopsis.split("similarity model")[0]
    documented = set(re.findall(r"(--[a-z][a-z0-9-]*)", score))
    assert documented == _parser_flags("score") - {"--output"}  # -o is shown as -o
    assert "-o OUTPUT" in score


def test_every_flag_is_explained_in_depth() -> None:
    explained = set(re.findall(r"`(--[a-z][a-z0-9-]*)", CLI_DOC)) | set(re.findall(r"(--[a-z][a-z0-9-]*)", README))
    assert _parser_flags("score") - {"--output"} <= explained


def test_install_lines_name_real_extras_and_targets() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    docs = README + CLI_DOC
    named = set(re.findall(r"'\.\[([a-z,]+)\]'", docs))
    assert named and all(set(n.split(",")) <= extras for n in named), named
    assert "text-image-similarity[" not in docs  # not on PyPI: only installs from a clone work
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert set(re.findall(r"`make ([a-z-]+)", README)) <= targets


def test_summary_json_fields_are_documented(tmp_path, monkeypatch) -> None:
    import inspect

    source = inspect.getsource(cli._cmd_score)
    fields = set(re.findall(r'^\s+"([a-z_]+)": ', source.split("summary: dict")[1], flags=re.M))
    section = _section(CLI_DOC, "## Progress, messages and the summary")
    assert fields and all(f"`{f}`" in section for f in fields), fields
