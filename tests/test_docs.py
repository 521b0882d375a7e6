"""The README stays short, its links resolve, and benchmarks/README.md matches the results it is made from."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_short_and_its_links_resolve():
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 150
    for md in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        links = relative_links(md)
        assert md != readme or links, "the README links to docs/"
        missing = [t for t in links if not (md.parent / t.split("#")[0]).exists()]
        assert not missing, f"{md.name}: broken links {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text(encoding="utf-8")


def test_benchmarks_readme_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_readme.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
