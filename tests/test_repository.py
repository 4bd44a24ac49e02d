"""The README's promises about the repository itself."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```bash", "the README must open with its two commands"
    return lines[1 : lines.index("```", 1)]


def test_readme_opens_with_exactly_two_commands_install_and_demo_then_tests():
    demo, tests = readme_commands()
    assert "pip install torch==2.13.0 -e ." in demo and "python demo.py" in demo
    assert '-e ".[test]"' in tests and "pytest" in tests


def test_ci_runs_the_readmes_test_command_word_for_word():
    _, tests = readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines, f"{tests!r} is not a line of .ci/run"
