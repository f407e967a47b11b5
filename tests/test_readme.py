"""README.md and .ci/run must agree on the test command; README snippets name real commands."""

import re
from pathlib import Path

from bfq_cli.main import main
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    block = ROOT.joinpath("README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if "pytest" in line]
    assert len(lines) == 1, "the README's first code block must have one test command"
    return lines[0].split("&&")[-1].strip()


def test_ci_runs_the_readme_test_command():
    ci = ROOT.joinpath(".ci/run").read_text()
    assert _readme_test_command() in ci.splitlines()


def test_readme_commands_exist():
    text = ROOT.joinpath("README.md").read_text()
    commands = set(re.findall(r"`bfq ([a-z]+)", text))
    assert commands, "README documents no bfq commands"
    runner = CliRunner()
    for command in sorted(commands):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, f"bfq {command} --help failed: {result.output}"


def test_pyproject_lists_every_package():
    """A wheel (`pip install .`, not -e) holds only the packages pyproject lists."""
    import tomllib

    tool = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    for name, folder in tool["package-dir"].items():
        found = {
            ".".join([name, *p.parent.relative_to(ROOT / folder).parts])
            for p in (ROOT / folder).rglob("__init__.py")
        }
        assert found <= listed, f"pyproject.toml [tool.setuptools] packages misses {sorted(found - listed)}"


def test_readme_python_snippet_runs_as_written_on_a_cpu(tmp_path, monkeypatch):
    """The first Python block of the README, run as written (the file name aside): the defaults
    (packed runtime, float32) work on a CPU-only machine."""
    from bfq.pipeline.quantize import quantize
    from bfq.runtime.packed import packed_layers

    quantize("tiny-sd", tmp_path / "tiny.bfq", recipe="uniform-2", progress=False)  # 20 steps, as the snippet samples
    block = ROOT.joinpath("README.md").read_text().split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["image"].size == (16, 16) and packed_layers(scope["unet"])
