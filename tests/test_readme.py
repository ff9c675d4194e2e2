"""The README's first screen and the public API it shows: what a newcomer reads first must work."""

import re
import subprocess
import sys
from pathlib import Path

import cartridges

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_first_screen_has_the_two_commands_and_use_before_the_first_docs_link():
    lines = README.splitlines()
    first_link = next(number for number, line in enumerate(lines, 1) if "](docs/" in line)
    assert first_link < 60
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make cartridge", "make test"]
    screen = "\n".join(lines[:first_link])
    for use in ("cartridges ask", "make chat", "cartridges serve", "OpenAI(base_url=", "import pathlib, cartridges"):
        assert use in screen


def test_every_name_the_readme_takes_from_cartridges_is_public_and_resolves():
    used = set(re.findall(r"\bcartridges\.([A-Za-z_]+)\(", README))
    assert used >= {"Registry", "load", "build", "load_build_config", "default_registry_url"}
    assert used <= set(cartridges.__all__)
    for name in cartridges.__all__:
        assert getattr(cartridges, name).__name__ == name


def test_importing_the_package_loads_neither_torch_nor_transformers():
    """The public names are imported on first use: `import cartridges` (and the CLI's start) stays light."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, cartridges; print(sorted({'torch', 'transformers'} & set(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]"


def test_every_relative_link_in_the_docs_points_at_a_file():
    documents = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    links = [
        (document, target)
        for document in documents
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text())
        if "://" not in target
    ]
    assert len(links) > 10
    assert [f"{doc.name}: {target}" for doc, target in links if not (doc.parent / target).exists()] == []
