"""MkDocs hooks (mkdocs.yml: ``hooks: [docs/hooks.py]``).

* Pages written by other parts of the project (benchmarks, guarantees,
  fuzzing) are in the navigation only once their file exists, so that
  ``mkdocs build --strict`` passes before and after they land.
* The build fails when docs/cli.md no longer matches the argparse parser
  (regenerate it with ``python docs/gen_cli.py``).
* The changelog page is the project's CHANGELOG.md, read at build time.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

HERE = Path(__file__).resolve().parent

#: nav entries that are dropped while their page does not exist yet
OPTIONAL_PAGES = {"architecture.md", "benchmarks.md", "guarantees.md", "fuzzing.md"}


def _present(target: str, docs_dir: Path) -> bool:
    if target == "changelog.md":  # generated from the repository's CHANGELOG.md
        return (docs_dir.parent / "CHANGELOG.md").is_file() or (docs_dir / target).is_file()
    return target not in OPTIONAL_PAGES or (docs_dir / target).is_file()


def _prune(nav: list[Any], docs_dir: Path) -> list[Any]:
    out: list[Any] = []
    for item in nav:
        if isinstance(item, dict):
            (title, target), = item.items()
            if isinstance(target, list):
                target = _prune(target, docs_dir)
                if target:
                    out.append({title: target})
            elif not isinstance(target, str) or _present(target, docs_dir):
                out.append({title: target})
        elif not isinstance(item, str) or _present(item, docs_dir):
            out.append(item)
    return out


def on_config(config: Any) -> Any:
    """Drop optional pages that are not written yet from the navigation."""
    if config.get("nav"):
        config["nav"] = _prune(config["nav"], Path(config["docs_dir"]))
    return config


def on_pre_build(config: Any) -> None:
    """Refuse to build with a CLI reference that differs from the parser."""
    spec = importlib.util.spec_from_file_location("vhdcore_docs_gen_cli", HERE / "gen_cli.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = Path(config["docs_dir"]) / "cli.md"
    if not page.is_file() or page.read_text(encoding="utf-8") != gen.render():
        raise PluginError("docs/cli.md does not match vhdcore.cli.build_parser(): "
                          "run python docs/gen_cli.py")


def on_files(files: Files, config: Any) -> Files:
    """Publish the repository's CHANGELOG.md as changelog.md."""
    changelog = Path(config["docs_dir"]).parent / "CHANGELOG.md"
    if changelog.is_file() and files.get_file_from_path("changelog.md") is None:
        files.append(File.generated(config, "changelog.md",
                                    content=changelog.read_text(encoding="utf-8")))
    return files
