"""The README's code blocks do what it says: every ```python block runs verbatim, twice in one
fresh directory (a second run must not trip over the first one's files); each ```jsonl line is a
fact the JSONL reader accepts; .ci/run runs exactly the README's test command."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
RUN_SECONDS = 1200  # the quickstart edits one fact with the real model: minutes on 2 busy cores


def blocks(language: str) -> list[str]:
    return [code for found, code in BLOCK.findall(README) if found == language]


def python_block_params() -> list:
    params = []
    for number, code in enumerate(blocks("python")):
        uses_model = "load_default_model" in code
        params.append(pytest.param(code, id=f"python-block-{number}", marks=[pytest.mark.slow] if uses_model else []))
    return params


def run_python(code: str, directory: pathlib.Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], cwd=directory, env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=RUN_SECONDS)


def test_every_code_block_is_of_a_kind_the_readme_explains():
    assert len(blocks("python")) >= 2 and blocks("jsonl"), "README lost its python or jsonl examples"
    unexplained = {language for language, _ in BLOCK.findall(README)} - {"python", "bash", "jsonl"}
    assert not unexplained, f"code blocks of kinds {unexplained}: the README says only which kinds run"


@pytest.mark.parametrize("code", python_block_params())
def test_python_block_runs_verbatim_twice(code, tmp_path):
    for attempt in ("first", "second"):
        result = run_python(code, tmp_path)
        assert result.returncode == 0, f"{attempt} run failed:\n{result.stderr[-4000:]}"
        if "load_default_model" in code:
            # the quickstart's claims: the edited model answers Rome, paused (unedited) it says Paris
            lines = result.stdout.splitlines()
            assert lines[0].startswith(" Rome") and lines[1].startswith(" Paris"), result.stdout


def test_jsonl_example_lines_are_facts_the_reader_accepts(tmp_path):
    from neuraldb_kernels.editing import read_jsonl

    lines = "".join(blocks("jsonl"))
    path = tmp_path / "facts.jsonl"
    path.write_text(lines, encoding="utf-8")
    facts = read_jsonl(path)
    assert len(facts) == len(lines.strip().splitlines())
    assert all(fact.subject in fact.filled_prompt for fact in facts)


def test_ci_runs_exactly_the_readme_test_command():
    command = BLOCK.search(README.split("Run the tests", 1)[1]).group(2).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"
