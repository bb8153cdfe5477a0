"""The README's *Library use* snippet runs as written (its import paths are the library's front door)."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_the_readme_library_snippet_runs(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Library use\n\n```python\n(.*?)```", text, re.S)
    assert code, "README.md lost its '## Library use' python block"
    monkeypatch.chdir(ROOT)
    exec(compile(code.group(1), "README.md#library-use", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["patient_A", "review"], ["patient_B", "review"], ["patient_C", "review"]]
