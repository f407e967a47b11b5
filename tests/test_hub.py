"""`bfq push`, loading by repo id and model cards, against a local fake Hub (tests/hub_server.py).

huggingface_hub uploads through Xet storage when hf_xet is installed; the fake Hub speaks plain LFS
only, so the client runs with HF_HUB_DISABLE_XET=1 (point_client_at). bfq's code uses only
huggingface_hub's public upload API (create_repo, preupload_lfs_files, create_commit), so the
transport is huggingface_hub's choice; test_xet_transport_is_left_to_huggingface_hub checks that
with Xet enabled the client does take the Xet route (and that its failure is one clear line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from bfq_cli.main import main
from click.testing import CliRunner

import bfq
from bfq import download as bfq_download
from bfq import hub as bfq_hub
from bfq.hub import HubDownloadError, HubError
from bfq.runtime.packed import packed_layers
from tests.helpers import tiny_unet
from tests.hub_server import FakeHub, free_port, point_client_at

# huggingface_hub itself passes file objects as `data=` to httpx2, which warns
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TOKEN = "hf_TestTokenMustNeverLeak0123456789"
BASE_REPO = "base/tiny-unet"
BASE_CARD = b"---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# a base model\n"
REPO = "user/tiny-bfq"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """v1: a tiny UNet quantized from the fake Hub, so that model.source is a Hub repo (whose card
    has a license); v2: another valid .bfq with no source (a spec golden file, cheaper than a second
    quantization)."""
    from bfq.pipeline.quantize import quantize

    root = tmp_path_factory.mktemp("hub-models")
    unet_dir = root / "unet"
    tiny_unet(seed=0).save_pretrained(unet_dir)
    base_files = {f"unet/{p.name}": p.read_bytes() for p in unet_dir.iterdir()} | {"README.md": BASE_CARD}
    with FakeHub(token=TOKEN) as server, pytest.MonkeyPatch.context() as mp:
        server.add_repo(BASE_REPO, base_files)
        point_client_at(mp, server.url, root / "hf-home", token=TOKEN)
        v1 = quantize(BASE_REPO, root / "v1.bfq", recipe="uniform-2", time_cache="grid", init="minmax", progress=False).path
    v2 = root / "v2.bfq"
    v2.write_bytes((Path(__file__).parents[1] / "spec" / "vectors" / "balanced_3bit.bfq").read_bytes())
    return SimpleNamespace(v1=Path(v1), v2=v2)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh fake Hub (holding the base model's card) and a client pointed at it, with its cache
    and token file in tmp_path and HF_TOKEN set."""
    with FakeHub(token=TOKEN) as server:
        server.add_repo(BASE_REPO, {"README.md": BASE_CARD})
        point_client_at(monkeypatch, server.url, tmp_path / "hf-home", token=TOKEN)
        yield server


def _cli(*args):
    return CliRunner().invoke(main, list(args))


def _one_error_line(result) -> str:
    """The CLI failed with exit status 2 (as every command does for what the user can fix) and exactly
    one `bfq: error:` line, claiming no success."""
    assert result.exit_code == 2, result.output
    # (a progress bar of huggingface_hub may precede the message on the same terminal line)
    errors = re.findall(r"(?:Error: |bfq: error: ).*", result.output)
    assert all(e.startswith("bfq: error: ") for e in errors), result.output
    assert len(errors) == 1, result.output
    assert "pushed" not in result.stdout and "commit http" not in result.stdout and "up to date" not in result.stdout
    assert "Traceback" not in result.output
    return errors[0]


def _pushed(server, repo: str) -> set[str]:
    """The repo's files but the .gitattributes the Hub makes with it."""
    return set(server.files(repo)) - {".gitattributes"}


def _api_calls(server):
    """Requests to the Hub API (the presigned storage URLs under /__lfs/ carry no token, as on S3)."""
    return [r for r in server.requests if not r.path.startswith("/__lfs/")]


# -- push ----------------------------------------------------------------------------------------


def test_push_uploads_bfq_through_lfs_and_card_as_regular_file(hub, models):
    result = bfq_hub.push(models.v1, REPO, filename="model.bfq")
    local = models.v1.read_bytes()
    assert hub.file(REPO, "model.bfq") == local  # the uploaded bytes are the local file
    assert hub.is_lfs(REPO, "model.bfq") and not hub.is_lfs(REPO, "README.md")
    assert hub.lfs_uploads == [(hashlib.sha256(local).hexdigest(), len(local))]
    assert result["up_to_date"] is False and result["commit_oid"] == hub.head(REPO)
    assert result["commit_url"].endswith(hub.head(REPO)) and result["load"] == REPO
    assert [u["path"] for u in result["uploaded"]] == ["model.bfq", "README.md"] and result["skipped"] == []
    # every API request carried the token (the presigned upload URL needs none)
    calls = _api_calls(hub)
    assert any(r.path.startswith("/api/repos/create") for r in calls)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in calls if r.path != "/api/agent-harnesses")
    assert TOKEN not in repr(result)


def test_model_card_metadata_recipe_and_snippet(hub, models):
    bfq_hub.push(models.v1, REPO, filename="model.bfq")
    card = hub.file(REPO, "README.md").decode()
    assert TOKEN not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "bfq"
    assert {"bfq", "quantization"} <= set(front["tags"])
    assert front["base_model"] == BASE_REPO and front["base_model_relation"] == "quantized"
    assert front["license"] == "creativeml-openrail-m"  # carried from the base repo's card
    summary = bfq.format.inspect.summarize(models.v1)
    assert f"**{summary['avg_bits']:.4f}**" in card
    for block in ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "conv_in/out"):
        assert re.search(rf"^\| {re.escape(block)} \| \d+ \| [\d,]+ \| .*-bit ×\d+ \| \d+\.\d\d \|$", card, re.M), block
    assert "in fp16" in card and "x smaller" in card  # grid mode keeps the small time MLP, no 1000-row table
    assert f'unet = bfq.load_unet("{REPO}")' in card
    assert f'pipe = bfq.load_pipeline("{REPO}")' in card
    assert "(fp16)" not in card and "float32 on the CPU" in card and "## Files" not in card  # one file: no table
    # the card is what model_card() gives, and deterministic
    again = bfq_hub.model_card(models.v1, repo_id=REPO, filename="model.bfq", token=TOKEN)
    assert again == card


def test_card_snippet_loads_what_it_says(hub, models):
    """The card's load_unet line, executed as written, returns the pushed model (float32 on the CPU)."""
    bfq_hub.push(models.v1, REPO, filename="model.bfq")
    card = hub.file(REPO, "README.md").decode()
    line = next(line for line in card.splitlines() if line.startswith("unet = bfq.load_unet("))
    scope = {"bfq": bfq}
    exec(line, scope)
    unet = scope["unet"]
    reference = bfq.load_unet(models.v1, dtype=torch.float32)
    assert unet.conv_in.bias.dtype == torch.float32
    for (name, a), (_, b) in zip(sorted(unet.state_dict().items()), sorted(reference.state_dict().items())):
        assert torch.equal(a, b), name


def _python_blocks(card: str) -> list[str]:
    return [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]


def test_default_push_of_a_file_with_a_known_base_publishes_the_diffusers_pipeline(hub, tmp_path, monkeypatch):
    """`bfq push` of a tiny-sd file (its base found as bfq.load_pipeline finds it): unet/ in the
    diffusers layout, the file's scheduler, the base's other components and model_index.json, the
    .bfq beside them; the card's first snippet is plain diffusers, and its bfq.load_pipeline snippet,
    run as written, loads the UNet once (packed, in this CPU's default compute dtype), samples the cached steps and
    saves an image. (tests/test_diffusers_native.py loads the repo with plain diffusers.)"""
    from bfq.pipeline.quantize import quantize
    from bfq.runtime import load as runtime_load
    from bfq.tinysd import pipeline_dir

    path = quantize("tiny-sd", tmp_path / "tiny.bfq", recipe="uniform-2", steps=2, progress=False).path
    result = _cli("push", str(path), "--repo", REPO)
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    assert f"DiffusionPipeline.from_pretrained('{REPO}')" in result.stdout
    base = Path(pipeline_dir())
    copied = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() and p.parent != base
              and p.relative_to(base).parts[0] not in ("unet", "scheduler")}  # fmt: skip
    assert {"vae/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json"} <= copied
    assert _pushed(hub, REPO) == {"tiny.bfq", "README.md", "model_index.json", "unet/config.json",
                                    "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} | copied  # fmt: skip
    assert all(hub.file(REPO, name) == (base / name).read_bytes() for name in copied | {"model_index.json"})
    assert hub.file(REPO, "tiny.bfq") == Path(path).read_bytes()
    assert json.loads(hub.file(REPO, "unet/config.json"))["quantization_config"]["quant_method"] == "bfq"
    blocks = _python_blocks(hub.file(REPO, "README.md").decode())
    assert f'DiffusionPipeline.from_pretrained("{REPO}")' in blocks[0] and "load_" not in blocks[0]
    loads = []
    real_load = runtime_load.load_unet
    monkeypatch.setattr(runtime_load, "load_unet", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(bfq, "load_unet", runtime_load.load_unet)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    block = next(b for b in blocks if "bfq.load_pipeline(" in b)
    exec(compile(block, "README.md", "exec"), scope)
    assert len(loads) == 1 and (tmp_path / "image.png").is_file() and "num_inference_steps=2)" in block
    unet = scope["pipe"].unet
    assert unet.conv_in.bias.dtype == runtime_load.compute_dtype("auto", "cpu") and packed_layers(unet)
    # --bfq-only: the .bfq and its card alone, the card without the diffusers snippet
    only = _cli("push", str(path), "--repo", "user/only", "--bfq-only")
    assert only.exit_code == 0 and "note:" not in only.output and "DiffusionPipeline" not in only.stdout, only.output
    assert _pushed(hub, "user/only") == {"tiny.bfq", "README.md"}
    assert "DiffusionPipeline.from_pretrained" not in hub.file("user/only", "README.md").decode()


def test_without_a_base_the_default_pushes_the_bfq_with_a_note_and_diffusers_refuses(hub, models):
    """v2 records no source and v1's source repo holds no pipeline: the default pushes the .bfq and
    its card and says in one note line that the repo is not a diffusers pipeline and what to pass;
    --diffusers (or a --base that is no pipeline) fails in one line and creates nothing."""
    for model, why in ((models.v2, "does not say which pipeline"), (models.v1, f"'{BASE_REPO}' is not a diffusers pipeline")):
        repo = f"user/{model.stem}"
        result = _cli("push", str(model), "--repo", repo)
        assert result.exit_code == 0, result.output
        notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and "not a diffusers pipeline" in notes[0] and "--base DIR_OR_REPO" in notes[0], result.stderr
        assert why in notes[0] and "DiffusionPipeline" not in result.stdout
        assert _pushed(hub, repo) == {model.name, "README.md"}
        refused = _one_error_line(_cli("push", str(model), "--repo", "user/refused", "--diffusers"))
        assert "--diffusers" in refused and "user/refused" not in hub.repos
    assert bfq_hub.push(models.v2, "user/lib")["note"] is not None and not bfq_hub.push(models.v2, "user/lib")["pipeline"]
    with pytest.raises(HubError, match="needs the base pipeline"):
        bfq_hub.push(models.v2, "user/lib2", diffusers=True)
    line = _one_error_line(_cli("push", str(models.v2), "--repo", "user/refused", "--base", str(models.v2.parent)))
    assert "is not a diffusers pipeline" in line and "user/refused" not in hub.repos and "user/lib2" not in hub.repos


def test_model_card_sources_and_block_grouping(models):
    summary = {"layers": [
        {"name": "conv_in.weight", "shape": [8, 4, 3, 3], "bits": 8, "num_levels": 257},
        {"name": "down_blocks.10.resnets.0.conv1.weight", "shape": [4, 4], "bits": 2, "num_levels": 5},
        {"name": "down_blocks.2.resnets.0.conv1.weight", "shape": [4, 4], "bits": 3, "num_levels": 9},
        {"name": "down_blocks.2.attentions.0.proj_in.weight", "shape": [4, 4], "bits": 1, "num_levels": 3},
        {"name": "mid_block.resnets.0.conv1.weight", "shape": [2, 2], "bits": 2, "num_levels": 5},
        {"name": "up_blocks.0.resnets.0.conv1.weight", "shape": [2, 2], "bits": 2, "num_levels": 5},
        {"name": "time_embedding.linear_1.weight", "shape": [2, 2], "bits": 4, "num_levels": 17},
        {"name": "conv_out.weight", "shape": [4, 8, 3, 3], "bits": 8, "num_levels": 257},
    ]}  # fmt: skip
    rows = bfq_hub.block_bits(summary)
    assert [r["block"] for r in rows] == ["down_blocks.2", "down_blocks.10", "mid_block", "up_blocks.0", "conv_in/out", "other"]
    down2 = rows[0]
    assert down2["layers"] == 2 and down2["weights"] == 32 and down2["widths"] == {1: 1, 3: 1}
    assert down2["avg_bits"] == pytest.approx((16 * 3.169925 + 16 * 1.5849625) / 32, rel=1e-5)
    assert rows[4]["layers"] == 2 and rows[4]["widths"] == {8: 2}
    # tiny-sd is this project's: its license; no Hub base; the bundled pipeline in the snippet
    tiny = bfq_hub.base_model_info({"kind": "builtin", "name": "tiny-sd"})
    assert tiny == {"base_model": None, "license": "apache-2.0", "pipeline": "tiny-sd"}
    # a local file: no base_model, no license guessed, the snippet asks for the base pipeline
    card = bfq_hub.model_card(models.v2, repo_id=REPO, revision="dev", name_file=True)
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front and "license" not in front
    assert f'bfq.load_unet("{REPO}/v2.bfq", revision="dev")' in card
    assert 'base="BASE_PIPELINE"' in card and "--revision dev" in card
    # offline, the base's license is not looked up (and not guessed)
    hub_source = {"kind": "hub", "repo": BASE_REPO, "revision": "0" * 40}
    assert bfq_hub.base_model_info(hub_source, lookup=False) == {"base_model": BASE_REPO, "license": None, "pipeline": BASE_REPO}


def test_repush_uploads_nothing(hub, models):
    first = bfq_hub.push(models.v1, REPO, filename="model.bfq")
    n_requests, n_commits = len(hub.requests), len(hub.commits(REPO))
    again = _cli("push", str(models.v1), "--repo", REPO, "--filename", "model.bfq")
    assert again.exit_code == 0, again.output
    assert "up to date" in again.stdout and "nothing uploaded" in again.stdout
    assert len(hub.commits(REPO)) == n_commits and hub.head(REPO) == first["commit_oid"]
    assert len(hub.lfs_uploads) == 1
    new = [r.path for r in hub.requests[n_requests:]]
    assert not any(re.search(r"/preupload/|/commit/|lfs/objects|^/__lfs/", p) for p in new), new
    # with a second .bfq in the repo the card's snippet must name the file: only the card is committed,
    # and the command says the .bfq was unchanged, not "pushed"
    bfq_hub.push(models.v2, REPO, filename="other.bfq")
    card_before = hub.file(REPO, "README.md")
    result = _cli("push", str(models.v1), "--repo", REPO, "--filename", "model.bfq")
    assert result.exit_code == 0, result.output
    assert "pushed" not in result.stdout and "unchanged" in result.stdout and "model.bfq, not uploaded" in result.stdout
    assert "updated README.md" in result.stdout and hub.file(REPO, "README.md") != card_before
    assert f"load it: bfq.load_unet('{REPO}/model.bfq')" in result.stdout and len(hub.lfs_uploads) == 2
    assert f'bfq.load_unet("{REPO}/model.bfq")' in hub.file(REPO, "README.md").decode()


def test_card_of_a_repo_with_several_files_lists_them_all(hub, models, tmp_path):
    """GGUF-style: one repo, several quantizations. Each push keeps every .bfq of the repo in the
    card's Files table (bits and size), the snippet naming the file just pushed."""
    bfq_hub.push(models.v1, REPO, filename="model-2bit.bfq")
    bfq_hub.push(models.v2, REPO, filename="q/model-3bit.bfq")
    card = hub.file(REPO, "README.md").decode()
    v1, v2 = (bfq.format.inspect.summarize(m) for m in (models.v1, models.v2))
    assert "## Files" in card and f'load_pipeline("{REPO}/q/model-3bit.bfq"' in card
    assert re.search(rf"^\| `model-2bit.bfq` \| {v1['avg_bits']:.4f} \| [\d.]+ kB \| uniform-2 \|$", card, re.M), card
    assert re.search(rf"^\| `q/model-3bit.bfq` \| {v2['avg_bits']:.4f} \| ", card, re.M), card
    # a third push keeps both earlier rows (read back from the card, checked against the Hub's sha256)
    third = tmp_path / "third.bfq"
    third.write_bytes(models.v1.read_bytes())
    bfq_hub.push(third, REPO, filename="again.bfq")
    card = hub.file(REPO, "README.md").decode()
    rows = re.findall(r"^\| `([^`]+)` \| ([\d.]+) \|", card, re.M)
    assert rows == [("again.bfq", f"{v1['avg_bits']:.4f}"), ("model-2bit.bfq", f"{v1['avg_bits']:.4f}"),
                    ("q/model-3bit.bfq", f"{v2['avg_bits']:.4f}")]  # fmt: skip
    assert f'load_pipeline("{REPO}/again.bfq"' in card
    # a file the card knows nothing of (uploaded another way, or replaced since) shows its size only
    hub.add_repo("user/mixed", {"foreign.bfq": models.v2.read_bytes()})
    bfq_hub.push(models.v1, "user/mixed", filename="mine.bfq")
    card = hub.file("user/mixed", "README.md").decode()
    assert re.search(r"^\| `foreign.bfq` \| \? \(not pushed with `bfq push`\) \| ", card, re.M), card


def test_large_file_multipart_upload(tmp_path, monkeypatch, models):
    with FakeHub(token=TOKEN, multipart_threshold=32 * 1024, chunk_size=40 * 1024) as server:
        point_client_at(monkeypatch, server.url, tmp_path / "hf-home", token=TOKEN)
        bfq_hub.push(models.v1, REPO)
        data = models.v1.read_bytes()
        parts = server.calls("PUT", r"^/__lfs/[0-9a-f]+/part/")
        assert len(parts) == -(-len(data) // (40 * 1024)) >= 2
        assert server.calls("POST", r"^/__lfs/[0-9a-f]+/complete")
        assert server.file(REPO, models.v1.name) == data


def test_cli_push_private_branch_and_output(hub, models):
    result = _cli("push", str(models.v2), "--repo", REPO, "--private", "--revision", "dev")
    assert result.exit_code == 0, result.output
    assert f"pushed to {hub.url}/{REPO}/tree/dev" in result.stdout and "v2.bfq (" in result.stdout
    assert f"load it: bfq.load_unet('{REPO}', revision='dev')" in result.stdout
    assert TOKEN not in result.output
    assert hub.repos[REPO].private
    assert hub.file(REPO, "v2.bfq", "dev") == models.v2.read_bytes() and hub.file(REPO, "v2.bfq") is None
    assert 'revision="dev"' in hub.file(REPO, "README.md", "dev").decode()


# -- load by repo id -----------------------------------------------------------------------------


def test_load_unet_by_repo_id_round_trip(hub, models):
    bfq_hub.push(models.v1, REPO, filename="model.bfq")
    path = bfq_hub.download_bfq(REPO)
    assert Path(path).read_bytes() == models.v1.read_bytes()
    assert str(path).startswith(str(Path(os.environ["HF_HOME"]) / "hub"))  # the (test's) HF cache
    unet = bfq.load_unet(REPO, dtype=torch.float32)
    reference = bfq.load_unet(models.v1, dtype=torch.float32)
    assert unet.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in reference.state_dict().items())
    named = bfq_hub.download_bfq(f"{REPO}/model.bfq")
    assert Path(named).read_bytes() == models.v1.read_bytes()


def test_revision_pinning(hub, models):
    first = bfq_hub.push(models.v1, REPO, filename="model.bfq")["commit_oid"]
    second = bfq_hub.push(models.v2, REPO, filename="model.bfq")["commit_oid"]
    assert first != second
    assert Path(bfq_hub.download_bfq(REPO)).read_bytes() == models.v2.read_bytes()
    assert Path(bfq_hub.download_bfq(REPO, revision=first)).read_bytes() == models.v1.read_bytes()
    bfq_hub.push(models.v1, REPO, filename="model.bfq", revision="dev")
    assert Path(bfq_hub.download_bfq(REPO, revision="dev")).read_bytes() == models.v1.read_bytes()
    result = _cli("inspect", REPO, "--revision", first, "--json")
    assert result.exit_code == 0, result.output
    assert '"recipe_name": "uniform-2"' in result.stdout


def test_inspect_and_verify_by_repo_id(hub, models):
    bfq_hub.push(models.v1, REPO)
    shown = _cli("inspect", REPO)
    assert shown.exit_code == 0, shown.output
    assert "avg bits" in shown.stdout and "uniform-2" in shown.stdout
    assert _cli("verify", f"{REPO}/{models.v1.name}").exit_code == 0
    missing = _cli("inspect", "user/missing")
    line = _one_error_line(missing)
    assert missing.exit_code == 2 and "repository not found (HTTP 404)" in line
    local = _cli("inspect", "some/dir.bfq")  # a missing local file, not a repo: no Hub request
    assert local.exit_code == 2 and "no such file: some/dir.bfq" in local.output


def test_offline_mode_uses_the_warm_cache_and_fails_cold(hub, models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    bfq_hub.push(models.v1, REPO, filename="model.bfq")
    bfq_hub.download_bfq(REPO)  # warm the cache
    hub.stop()  # no server at all from here on
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = bfq_hub.download_bfq(REPO)
    assert Path(path).read_bytes() == models.v1.read_bytes()
    assert isinstance(bfq.load_unet(REPO, dtype=torch.float32), torch.nn.Module)
    assert Path(bfq_hub.download_bfq(f"{REPO}/model.bfq")).read_bytes() == models.v1.read_bytes()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cold"))
    with pytest.raises(HubDownloadError) as cold:
        bfq.load_unet(REPO)
    message = str(cold.value)
    assert "\n" not in message and "offline mode is on (HF_HUB_OFFLINE=1)" in message and "not in the local Hugging Face cache" in message
    assert isinstance(cold.value, FileNotFoundError)
    with pytest.raises(HubDownloadError, match="offline mode is on"):
        bfq_hub.download_bfq(f"{REPO}/model.bfq")


def test_interrupted_download_resumes_or_fails_cleanly(hub, models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    bfq_hub.push(models.v1, REPO, filename="model.bfq")
    hub.fail("GET", r"/resolve/", drop=True, times=1)
    assert Path(bfq_hub.download_bfq(REPO)).read_bytes() == models.v1.read_bytes()  # resumed with a Range request
    assert any(r.method == "GET" and "/resolve/" in r.path for r in hub.requests)
    hub.clear_failures()
    hub.fail("GET", r"/resolve/", drop=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cold"))
    with pytest.raises(HubDownloadError) as err:
        bfq_hub.download_bfq(REPO)
    assert "\n" not in str(err.value) and "was interrupted" in str(err.value)
    assert not [p for p in (tmp_path / "cold").rglob("*.bfq")]  # no partial file left as if complete


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, pattern, status, tries, expected",
    [
        ("POST", r"^/api/repos/create", 500, 1, "cannot create the repo: the Hub answered HTTP 500"),
        ("GET", r"/tree/", 404, 1, "cannot list the repo's files: the Hub answered HTTP 404"),
        ("POST", r"/preupload/", 503, 6, "upload of model.bfq, README.md failed: the Hub answered HTTP 503"),
        ("POST", r"lfs/objects/batch", 404, 1, "upload of model.bfq, README.md failed: the Hub answered HTTP 404"),
        ("PUT", r"^/__lfs/", 500, 6, "upload of model.bfq, README.md failed: the Hub answered HTTP 500"),
        ("POST", r"lfs/objects/verify", 500, 6, "upload of model.bfq, README.md failed: the Hub answered HTTP 500"),
        ("POST", r"/commit/", 500, 1, "commit failed: the Hub answered HTTP 500"),
        ("POST", r"/commit/", 401, 1, "commit failed: authentication failed (HTTP 401"),
    ],
)
def test_push_failures_are_one_line_and_commit_nothing(hub, models, method, pattern, status, tries, expected):
    hub.fail(method, pattern, status=status)
    result = _cli("push", str(models.v1), "--repo", REPO, "--filename", "model.bfq")
    line = _one_error_line(result)
    assert expected in line, line
    assert line.endswith(("nothing was committed", "nothing was uploaded")), line
    assert TOKEN not in result.output
    assert hub.file(REPO, "model.bfq") is None and len(hub.commits(REPO)) <= 1  # at most the repo's initial commit
    assert len(hub.calls(method, pattern)) == tries  # 5xx on the transfer routes: huggingface_hub retried 5 times


def test_interrupted_upload(hub, models):
    hub.fail("PUT", r"^/__lfs/", drop=True)
    with pytest.raises(HubError) as err:
        bfq_hub.push(models.v1, REPO, filename="model.bfq")
    message = str(err.value)
    assert "\n" not in message
    assert "upload of model.bfq, README.md failed: the connection to" in message and "was interrupted" in message
    assert message.endswith("nothing was committed")
    assert hub.file(REPO, "model.bfq") is None and hub.lfs_store == {}
    # a transient cut is retried by huggingface_hub and the push goes through
    hub.clear_failures()
    hub.fail("PUT", r"^/__lfs/", drop=True, times=2)
    assert bfq_hub.push(models.v1, REPO, filename="model.bfq")["up_to_date"] is False
    assert hub.file(REPO, "model.bfq") == models.v1.read_bytes()


def test_auth_wrong_missing_token_and_private_repo(hub, models, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_WrongTokenAlsoSecret987654321")
    wrong = _cli("push", str(models.v1), "--repo", REPO)
    line = _one_error_line(wrong)
    assert "authentication failed (HTTP 401: Invalid credentials in Authorization header)" in line
    assert "hf_WrongTokenAlsoSecret987654321" not in wrong.output and REPO not in hub.repos
    monkeypatch.delenv("HF_TOKEN")
    n = len(hub.requests)
    missing = _cli("push", str(models.v1), "--repo", REPO)
    assert "no Hugging Face token" in _one_error_line(missing) and len(hub.requests) == n  # nothing sent
    # the token file written by `hf auth login` is a standard source too
    Path(os.environ["HF_HOME"]).mkdir(parents=True, exist_ok=True)
    Path(os.environ["HF_HOME"], "token").write_text(TOKEN)
    from huggingface_hub import constants

    assert constants.HF_TOKEN_PATH == str(Path(os.environ["HF_HOME"], "token"))
    assert bfq_hub.push(models.v1, REPO, private=True)["up_to_date"] is False
    Path(os.environ["HF_HOME"], "token").unlink()
    with pytest.raises(HubDownloadError, match=r"repository not found \(HTTP 401\)"):
        bfq_hub.download_bfq(REPO)  # private, and no token


def test_connection_refused(tmp_path, monkeypatch, models):
    endpoint = f"http://127.0.0.1:{free_port()}"
    point_client_at(monkeypatch, endpoint, tmp_path / "hf-home", token=TOKEN)
    result = _cli("push", str(models.v1), "--repo", REPO)
    line = _one_error_line(result)
    assert f"cannot create the repo: cannot connect to {endpoint}" in line and "nothing was uploaded" in line
    with pytest.raises(HubDownloadError, match=f"cannot connect to {endpoint}.*not in the local Hugging Face cache"):
        bfq_hub.download_bfq(REPO)


def test_download_not_found_errors(hub, models):
    bfq_hub.push(models.v1, REPO, filename="model.bfq")
    cases = {
        ("user/missing", None): "repository not found (HTTP 404)",
        (f"{REPO}/other.bfq", None): "file not found in the repo (HTTP 404)",
        (REPO, "no-such-branch"): "revision not found (HTTP 404)",
    }
    for (spec, revision), expected in cases.items():
        with pytest.raises(HubDownloadError) as err:
            bfq_hub.download_bfq(spec, revision=revision)
        assert expected in str(err.value) and "\n" not in str(err.value)
    hub.fail("HEAD", r"/resolve/", status=500)
    with pytest.raises(HubDownloadError, match=r"HTTP 500.*not in the local Hugging Face cache either"):
        bfq_hub.download_bfq(f"{REPO}/model.bfq")
    # `bfq generate` resolves repo ids the same way
    generated = _cli("generate", "user/missing", "--prompt", "a digit")
    assert "repository not found (HTTP 404)" in _one_error_line(generated) and generated.exit_code == 2


def test_token_never_in_output_logs_or_files(hub, models, tmp_path, monkeypatch, caplog, capfd):
    import logging

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub logs every request as curl
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hf_logger = logging.getLogger("huggingface_hub")  # does not propagate to the root logger
    hf_logger.addHandler(caplog.handler)
    try:
        ok = _cli("push", str(models.v1), "--repo", REPO)
        again = _cli("push", str(models.v1), "--repo", REPO)
        hub.fail("POST", r"/commit/", status=500)
        failed = _cli("push", str(models.v2), "--repo", REPO)
        bfq.load_unet(REPO, dtype=torch.float32)
    finally:
        hf_logger.removeHandler(caplog.handler)
    assert ok.exit_code == 0 and again.exit_code == 0 and failed.exit_code == 2
    captured = capfd.readouterr()
    for text in (ok.output, again.output, failed.output, caplog.text, captured.out, captured.err):
        assert TOKEN not in text
    assert any("curl" in r.getMessage() for r in caplog.records)  # the debug log was on
    for path in Path(os.environ["HF_HOME"]).rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for commit in hub.commits(REPO):
        assert all(TOKEN.encode() not in blob.data for blob in commit.files.values())


def test_error_text_is_scrubbed_of_the_token():
    assert TOKEN not in bfq_download._scrub(f"server said: bad header 'Bearer {TOKEN}'\nsecond line", TOKEN)
    other = "hf_" + "AbCdEfGh12" * 3 + "xyzw"  # the shape of a real token (hf_ + 34 letters and digits)
    assert bfq_download._scrub(f"token={TOKEN} and {other}, repo hf_user/x", None) == "token=hf_*** and hf_***, repo hf_user/x"


def test_repo_id_parsing():
    assert bfq_hub.parse_repo_id("user/name") == ("user/name", None)
    assert bfq_hub.parse_repo_id("user/name/sub/model.bfq") == ("user/name", "sub/model.bfq")
    for spec in ("dir/model.bfq", "/abs/model.bfq", "./x/y", "name", "a/b/c"):
        assert not bfq_hub.is_repo_id(spec), spec
    with pytest.raises(FileNotFoundError):
        bfq.load_unet("dir/missing.bfq")


def test_push_rejects_bad_arguments(hub, models, tmp_path):
    with pytest.raises(HubError, match="give a Hub repo id"):
        bfq_hub.push(models.v1, "not-a-repo")
    with pytest.raises(HubError, match="give a Hub repo id"):
        bfq_hub.push(models.v1, "user/name/file.bfq")
    with pytest.raises(HubError, match="push needs a branch name"):
        bfq_hub.push(models.v1, REPO, revision="0123456789abcdef0123456789abcdef01234567")
    assert hub.requests == []


@pytest.mark.parametrize("args, expected", [
    (["--filename", "../x.bfq"], "--filename '../x.bfq'"), (["--filename", "/abs/x.bfq"], "--filename"),
    (["--filename", "a//x.bfq"], "--filename"), (["--filename", ".git/x.bfq"], "--filename"),
    (["--filename", "x.bin"], "ending in .bfq"), (["--filename", ".bfq"], "--filename"),
    (["--filename", "my model.bfq"], "--filename"), (["--revision", "a..b"], "not a valid branch name"),
    (["--revision", "dev branch"], "not a valid branch name"), (["--revision", "x.lock"], "not a valid branch name"),
    (["--repo", "user/a b"], "give a Hub repo id"), (["--preview-steps", "3"], "--preview-steps only apply to the preview"),
    (["--device", "cpu"], "--device only apply"), (["--runtime", "dense"], "--runtime only apply"),
    (["--bfq-only", "--base", "x"], "--base only apply"), (["--diffusers", "--bfq-only"], "contradict each other"),
])  # fmt: skip
def test_every_bad_argument_is_refused_before_the_first_hub_call(hub, models, args, expected):
    """`bfq push --filename ../x.bfq` used to create the repo and then crash: every argument is
    checked first, so a failing command creates nothing on the Hub."""
    repo = ["--repo", REPO] if "--repo" not in args else []
    line = _one_error_line(_cli("push", str(models.v1), *repo, *args))
    assert expected in line and hub.requests == [] and REPO not in hub.repos


def test_push_rejects_bad_arguments_on_a_broken_file(hub, models, tmp_path):
    broken = tmp_path / "broken.bfq"
    data = bytearray(models.v1.read_bytes())
    data[-3] ^= 0xFF
    broken.write_bytes(bytes(data))
    result = _cli("push", str(broken), "--repo", REPO)
    assert "crc32" in _one_error_line(result) and hub.requests == []


# -- preview -------------------------------------------------------------------------------------


def test_preview_is_generated_uploaded_and_shown(hub, models, monkeypatch):
    from PIL import Image

    calls = []

    def fake_generate(model, prompts, *, out, **kwargs):
        calls.append((model, prompts, kwargs))
        Image.new("RGB", (8 * kwargs["num_images"], 8 * len(prompts)), (200, 30, 30)).save(out)
        return Path(out)

    monkeypatch.setattr("bfq.runtime.generate.generate", fake_generate)
    result = bfq_hub.push(models.v1, REPO, preview=True, preview_prompts=["a red square"], preview_steps=3)
    assert [u["path"] for u in result["uploaded"]] == [models.v1.name, "README.md", "preview.png"]
    assert calls[0][0] == str(models.v1) and calls[0][1] == ["a red square"] and calls[0][2]["steps"] == 3
    assert hub.file(REPO, "preview.png").startswith(b"\x89PNG") and hub.is_lfs(REPO, "preview.png")
    card = hub.file(REPO, "README.md").decode()
    assert "## Preview" in card and "](preview.png)" in card and "'a red square'" in card
    # the same preview again: nothing new
    assert bfq_hub.push(models.v1, REPO, preview=True, preview_prompts=["a red square"], preview_steps=3)["up_to_date"]


def test_preview_failure_uploads_nothing(hub, models, monkeypatch):
    def broken_generate(*args, **kwargs):
        raise OSError("no VAE here\nsecond line")

    monkeypatch.setattr("bfq.runtime.generate.generate", broken_generate)
    result = _cli("push", str(models.v1), "--repo", REPO, "--preview")
    line = _one_error_line(result)
    assert "preview: generating images with v1.bfq failed (OSError: no VAE here); nothing was uploaded" in line
    # only the base pipeline was looked for (read before the preview, the heavy part)
    assert [(r.method, r.path) for r in hub.requests] == [("HEAD", f"/{BASE_REPO}/resolve/main/model_index.json")]
    assert REPO not in hub.repos


# -- transports and the environment --------------------------------------------------------------


def test_xet_transport_is_left_to_huggingface_hub(hub, models, monkeypatch):
    """With Xet enabled (hf_xet installed, as on the real Hub) huggingface_hub takes the Xet route:
    bfq does not force a transport. The fake Hub has no Xet, so the push fails: in one line, with
    the hint, and without a commit."""
    from huggingface_hub import constants

    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(HubError) as err:
        bfq_hub.push(models.v1, REPO)
    assert hub.calls("GET", r"/xet-write-token/")  # hf_xet asked for its write token
    message = str(err.value)
    assert "\n" not in message and "set HF_HUB_DISABLE_XET=1" in message and "nothing was committed" in message
    assert hub.file(REPO, models.v1.name) is None


def test_cli_in_a_fresh_process_configured_by_environment(hub, models, tmp_path):
    """The documented route: HF_ENDPOINT / HF_HOME / HF_TOKEN / HF_HUB_DISABLE_XET in the
    environment of a new process (nothing patched)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "child-home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
    script = (
        "import sys\nfrom bfq_cli.main import main\n"
        "main(['push', sys.argv[1], '--repo', sys.argv[2]], standalone_mode=False)\n"
        "main(['inspect', sys.argv[2], '--json'], standalone_mode=False)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(models.v1), REPO], env=env, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert "pushed to" in child.stdout and TOKEN not in child.stdout + child.stderr
    assert hub.file(REPO, models.v1.name) == models.v1.read_bytes()
    assert str(tmp_path / "child-home" / "hub") in child.stdout  # inspect downloaded into the child's HF_HOME
    assert all(r.authorization == f"Bearer {TOKEN}" for r in _api_calls(hub) if r.path != "/api/agent-harnesses")
