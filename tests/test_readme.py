"""Every ```python block of README.md runs as written (in a scratch folder)."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 6                         # one per method file, and the HF one
    assert any("Trainer" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path, monkeypatch):
    needs = re.findall(r"^(?:from|import) (transformers|peft|bitsandbytes)", BLOCKS[i], re.M)
    for package in needs:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package} (pip install -r tests/requirements.txt)")
    monkeypatch.chdir(tmp_path)                    # examples may save files
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
