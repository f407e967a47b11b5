"""README.md and .ci/run must agree on the test command; README snippets name real commands."""

import re
from pathlib import Path

from bfq_cli.main import main
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _blocks(language: str) -> list[str]:
    text = ROOT.joinpath("README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split(f"```{language}\n")[1:]]


def _readme_test_command() -> str:
    lines = [line for block in _blocks("bash") for line in block.splitlines() if "pytest" in line]
    assert len(lines) == 1, "the README must show one test command"
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


def test_every_readme_python_snippet_runs_as_written_on_a_cpu(tmp_path, monkeypatch):
    """Every Python block of the README, run as written, in order, each in a fresh namespace, in a
    folder holding the tiny.bfq the README's commands make, with a (local, fake) Hub holding the
    repo the Hub snippet names: the defaults (packed runtime, float32) work on a CPU-only machine."""
    from bfq.hub import push
    from bfq.pipeline.quantize import quantize
    from bfq.runtime.packed import packed_layers
    from tests.hub_server import FakeHub, point_client_at

    blocks = _blocks("python")
    assert len(blocks) >= 3 and any("finetune(" in b for b in blocks) and any("you/tiny-sd-2bit" in b for b in blocks)
    quantize("tiny-sd", tmp_path / "tiny.bfq", recipe="uniform-2", progress=False)  # 20 steps, as the snippets sample
    monkeypatch.chdir(tmp_path)
    with FakeHub(token="hf_readme") as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home", token="hf_readme")
        hub.add_repo("you/tiny-sd-2bit")
        push(tmp_path / "tiny.bfq", "you/tiny-sd-2bit")  # as the README's `bfq push` does: the diffusers pipeline
        scopes = []
        for i, block in enumerate(blocks):
            scopes.append({})
            exec(compile(block, f"README.md python block {i + 1}", "exec"), scopes[-1])
    assert scopes[0]["image"].size == (16, 16) and packed_layers(scopes[0]["unet"])
    assert "DiffusionPipeline.from_pretrained" in blocks[0] and "import bfq" in blocks[0] and "load_" not in blocks[0]
    assert (tmp_path / "tiny-ft.bfq").is_file()  # the fine-tuning snippet wrote its file
    from_hub = next(scope for scope, block in zip(scopes, blocks) if "you/tiny-sd-2bit" in block)
    assert packed_layers(from_hub["unet"]) and from_hub["unet"].conv_in.bias.dtype.is_floating_point


def test_first_screen_shows_what_bfq_does_how_to_install_and_a_picture():
    """The first ~45 lines: what bfq does, the picture (committed, made by the documented script),
    and torch for a CPU or a GPU inside a virtual environment."""
    first = "\n".join(ROOT.joinpath("README.md").read_text().splitlines()[:45])
    picture = re.search(r"!\[[^\]]+\]\(([^)]+\.png)\)", first)
    assert picture and ROOT.joinpath(picture.group(1)).stat().st_size < 200_000
    assert "python bench/readme_grid.py" in first and ROOT.joinpath("bench/readme_grid.py").is_file()
    assert "python3 -m venv" in first and "download.pytorch.org/whl/cpu" in first and "CUDA build" in first
    assert "2 bits per weight" in first
