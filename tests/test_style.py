"""Product code stays readable side by side: lines of at most 110 characters (pyproject.toml sets the
same limit for `ruff check`)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 110


def test_product_code_lines_are_at_most_110_characters():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout: walk the tree instead
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                 if f.endswith(".py") and ".venv" not in d]
    product = [f for f in files if not f.startswith(("tests/", ".venv/"))]
    assert len(product) > 10
    long = [f"{f}:{i}" for f in product for i, line in enumerate(open(os.path.join(ROOT, f), encoding="utf-8"), 1)
            if len(line.rstrip("\n")) > LIMIT]
    assert not long, f"lines over {LIMIT} characters: {', '.join(long)}"
