"""`bfq quantize` from Hub repos in the forms a diffusers user passes (issue 13 §6): a pipeline repo,
a UNet repo, a repo plus a subfolder, a revision; only what is needed is downloaded, and the repo
becomes the model card's base_model. Against the local fake Hub (tests/hub_server.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from bfq_cli.main import main
from click.testing import CliRunner

from bfq.format import open_bfq
from bfq.pipeline.models import ModelError, resolve_model
from tests.helpers import tiny_unet
from tests.hub_server import FakeHub, point_client_at

JUNK = b"\0never downloaded" * 64  # stands in for the big files of a real repo


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub() as server:
        point_client_at(monkeypatch, server.url, tmp_path / "hf-home")
        yield server


@pytest.fixture(scope="module")
def unet_files(tmp_path_factory):
    """{seed: {file name: bytes}} of two different tiny UNets saved by diffusers."""
    out = {}
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"unet{seed}")
        tiny_unet(seed=seed).save_pretrained(folder)
        out[seed] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return out


def _under(prefix: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{prefix}{name}": data for name, data in files.items()}


def _same_weights(unet, seed: int) -> bool:
    reference = tiny_unet(seed=seed).state_dict()
    return all(torch.equal(v, reference[k]) for k, v in unet.state_dict().items())


def _downloaded(hub) -> set[str]:
    return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.calls("GET", r"/resolve/")}


def _quantize(*args):
    return CliRunner().invoke(main, ["quantize", *map(str, args), "--recipe", "uniform-2", "--quiet"])


def test_pipeline_repo_fetches_only_the_unet_and_the_scheduler(hub, unet_files, tmp_path):
    from diffusers import DDIMScheduler

    sched = tmp_path / "sched"
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(sched)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}  # fmt: skip
    hub.add_repo("org/pipe", {
        "model_index.json": json.dumps(index).encode(), **_under("unet/", unet_files[1]),
        "scheduler/scheduler_config.json": (sched / "scheduler_config.json").read_bytes(),
        "unet/diffusion_pytorch_model.fp16.safetensors": JUNK, "v1-5-pruned.safetensors": JUNK,
        "text_encoder/model.safetensors": JUNK,
    })  # fmt: skip
    out = tmp_path / "p.bfq"
    r = _quantize("org/pipe", "--steps", "10", "-o", out)  # a scheduler-mode cache: the repo's scheduler came along
    assert r.exit_code == 0, r.output
    assert _downloaded(hub) == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                "scheduler/scheduler_config.json"}  # fmt: skip
    with open_bfq(out) as f:
        assert f.header.model["source"] == {"kind": "hub", "repo": "org/pipe", "revision": hub.head("org/pipe")}
        assert f.header.time_cache.mode == "scheduler" and len(f.header.time_cache.timesteps) == 10


def test_unet_repo(hub, unet_files):
    hub.add_repo("org/bare-unet", unet_files[1])
    resolved = resolve_model("org/bare-unet")
    assert _same_weights(resolved.unet, 1) and resolved.scheduler is None


def test_repo_plus_subfolder_and_the_card_names_the_repo(hub, unet_files, tmp_path):
    from bfq.hub import model_card

    hub.add_repo("org/many", {**_under("models/a/", unet_files[1]), **_under("models/b/", unet_files[2])})
    out = tmp_path / "b.bfq"
    r = _quantize("org/many", "--subfolder", "models/b", "--time-cache", "grid", "-o", out)
    assert r.exit_code == 0, r.output
    with open_bfq(out) as f:
        source = f.header.model["source"]
    assert (source["repo"], source["subfolder"]) == ("org/many", "models/b")
    assert _same_weights(resolve_model("org/many", subfolder="models/b").unet, 2)
    card = model_card(out, repo_id="you/many-2bit")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/many" and meta["base_model_relation"] == "quantized"
    with pytest.raises(ModelError, match="has no models/c/config.json"):
        resolve_model("org/many", subfolder="models/c")
    with pytest.raises(ModelError, match="neither a diffusers pipeline .* name it with --subfolder"):
        resolve_model("org/many")


def test_revision(hub, unet_files):
    first = hub.add_repo("org/evolving", unet_files[1])
    second = hub.add_repo("org/evolving", unet_files[2])
    old = resolve_model("org/evolving", revision=first)
    assert _same_weights(old.unet, 1) and old.source["revision"] == first
    new = resolve_model("org/evolving")
    assert _same_weights(new.unet, 2) and new.source["revision"] == second
