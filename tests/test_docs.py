"""The documentation's examples work and its CLI reference matches the parser.

Conventions (also stated in docs/index.md):

* every block fenced as ```` ```python ```` in ``docs/*.md`` is run on its own,
  in a fresh temporary directory, and must not raise;
* blocks fenced as ```` ```py ```` are shown with the same highlighting but not
  run (they need a server or credentials);
* in ```` ```console ```` blocks, every ``$ vhdcore ...`` or
  ``$ python -m vhdcore ...`` command must parse with the CLI's parser;
* docs/cli.md is what ``docs/gen_cli.py`` renders from the parser.

The tests skip when the docs are not beside the tests (a wheel tested from a
copy of ``tests/``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(not (DOCS / "gen_cli.py").is_file(),
                                reason="the docs are not beside the tests")

_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


def _blocks(path: Path) -> list[tuple[str, int, str]]:
    """(info string, first line number, text) of every fenced block of a page."""
    out: list[tuple[str, int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, indent = m["fence"], m["info"].strip(), len(m["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        out.append((info, i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return out


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md")) if DOCS.is_dir() else []


def _examples(kind: str) -> list[object]:
    params = []
    for page in _pages():
        for info, line, text in _blocks(page):
            if info.split()[:1] == [kind]:
                params.append(pytest.param(page, line, text, id=f"{page.name}:{line}"))
    return params


def test_the_conventions_are_used():
    """Guards the extractor itself: the quickstart has runnable and console examples."""
    kinds = [info.split()[:1] for info, _, _ in _blocks(DOCS / "quickstart.md")]
    assert ["python"] in kinds and ["console"] in kinds and ["py"] in kinds


@pytest.mark.parametrize("page,line,code", _examples("python"))
def test_python_example_runs(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, f"{page.name}:{line}", "exec")
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compiled, namespace)


@pytest.mark.parametrize("page,line,code", _examples("py"))
def test_shown_only_example_compiles(page, line, code):
    compile(code, f"{page.name}:{line}", "exec")


def _cli_commands(text: str) -> list[list[str]]:
    commands = []
    for raw in text.splitlines():
        if not raw.startswith("$ "):
            continue
        cmd = raw[2:].split(" #", 1)[0]
        for sep in ("|", "&&", ">", ";"):
            cmd = cmd.split(sep, 1)[0]
        words = shlex.split(cmd)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words.pop(0)  # VAR=value prefixes
        if words[:3] == ["python", "-m", "vhdcore"]:
            commands.append(words[3:])
        elif words[:1] == ["vhdcore"]:
            commands.append(words[1:])
    return commands


def _console_commands() -> list[object]:
    params = []
    for page in _pages():
        if page.name == "cli.md":
            continue
        for info, line, text in _blocks(page):
            if info.split()[:1] == ["console"]:
                for argv in _cli_commands(text):
                    params.append(pytest.param(argv, id=f"{page.name}:{line}:{' '.join(argv)[:40]}"))
    return params


@pytest.mark.parametrize("argv", _console_commands())
def test_console_example_parses(argv):
    from vhdcore.cli import build_parser

    parser = build_parser()
    if argv in (["--version"], ["--help"], ["-h"]):
        with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
        assert exc.value.code == 0
        return
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"vhdcore {' '.join(argv)}: {err.getvalue().strip()}")


def _gen_cli():
    spec = importlib.util.spec_from_file_location("vhdcore_docs_gen_cli", DOCS / "gen_cli.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_current():
    """docs/cli.md is regenerated with ``python docs/gen_cli.py`` after a CLI change."""
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == _gen_cli().render(), (
        "docs/cli.md is stale: run python docs/gen_cli.py"
    )


def test_cli_reference_covers_every_command_and_option():
    from vhdcore.cli import build_parser

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sp in sub.choices.items():
        assert f"## vhdcore {name}\n" in text
        for action in sp._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}" in text or f", {opt}" in text, (name, opt)


def test_console_extractor():
    text = "$ vhdcore info a.vhd --json | jq .\n$ OS_X=1 python -m vhdcore demo  # note\n$ pip install x\n"
    assert _cli_commands(text) == [["info", "a.vhd", "--json"], ["demo"]]
