"""Folder data (``--data folder:PATH``): encoded once, cached in the work directory, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bfq.pipeline.finetune import encoding
from bfq.pipeline.finetune.data import image_caption_folder
from bfq.tinysd import pipeline_dir
from bfq.tinysd.data import write_digit_folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    write_digit_folder(folder, 7)
    return folder


class _Interrupted(Exception):
    pass


def _count_encodings(monkeypatch, fail_at: int | None = None) -> list:
    """Count the VAE encoder calls; raise on call number ``fail_at`` (a killed encoding pass)."""
    calls = []
    real = encoding.encode_images

    def counting(vae, images, batch_size=64):
        calls.append(len(images))
        if fail_at is not None and len(calls) == fail_at:
            raise _Interrupted
        return real(vae, images, batch_size)

    monkeypatch.setattr(encoding, "encode_images", counting)
    return calls


def test_batches_do_not_run_the_encoders(digits, monkeypatch):
    """Issue 14 defect 3: the VAE and the text encoder used to run for every micro-batch."""
    source = image_caption_folder(digits, pipeline_dir(), batch_size=3)
    calls = _count_encodings(monkeypatch)
    monkeypatch.setattr(encoding, "encode_text", lambda *a, **k: pytest.fail("text encoded in the training loop"))
    b = source.batch(4)
    assert calls == []
    assert b["latents"].shape == (3, 4, 8, 8) and b["encoder_hidden_states"].shape == (3, 77, 64)
    assert torch.equal(source.batch(4)["latents"], b["latents"])  # a pure function of the index
    assert not torch.equal(source.batch(5)["latents"][:1], b["latents"][:1])


def test_encoding_matches_direct_encoding(digits):
    """The cached values are the VAE posterior and text embedding of each example."""
    pairs = encoding.folder_pairs(digits)
    source = image_caption_folder(digits, pipeline_dir(), batch_size=2)
    tok, text_encoder = encoding.load_text_encoder(pipeline_dir())
    vae = encoding.load_vae(pipeline_dir())
    images = torch.stack([encoding.load_image(p, 16) for p, _ in pairs])
    mean, std = encoding.encode_images(vae, images)
    ehs = encoding.encode_text(tok, text_encoder, [c for _, c in pairs])
    torch.testing.assert_close(torch.from_numpy(source.encoded.mean), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(source.encoded.std), std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(source.encoded.ehs), ehs, rtol=1e-5, atol=1e-6)


def test_killed_encoding_continues_and_a_finished_cache_is_reused(digits, tmp_path, monkeypatch):
    pairs = encoding.folder_pairs(digits)
    whole = encoding.encode_folder(pairs, pipeline_dir(), size=16, chunk=2)  # in memory, uninterrupted
    calls = _count_encodings(monkeypatch, fail_at=3)
    with pytest.raises(_Interrupted):
        encoding.encode_folder(pairs, pipeline_dir(), size=16, cache_dir=tmp_path, chunk=2)
    (path,) = tmp_path.iterdir()
    assert json.loads((path / "progress.json").read_text())["done"] == 4  # two chunks of 2 were kept
    calls = _count_encodings(monkeypatch)
    notes = []
    resumed = encoding.encode_folder(pairs, pipeline_dir(), size=16, cache_dir=tmp_path, chunk=2, log=notes.append)
    assert calls == [2, 1] and notes and "at 4" in notes[0]  # only the rest: examples 4-5 and 6
    for field in ("mean", "std", "ehs"):
        assert np.array_equal(getattr(resumed, field), getattr(whole, field)), field
    assert isinstance(resumed.mean, np.memmap)
    again = encoding.encode_folder(pairs, pipeline_dir(), size=16, cache_dir=tmp_path, chunk=2)
    assert calls == [2, 1] and np.array_equal(again.ehs, whole.ehs)  # nothing encoded the second time
    (digits / "digit-00000.txt").write_text("the number 9\n")  # other data: another cache
    try:
        encoding.encode_folder(encoding.folder_pairs(digits), pipeline_dir(), size=16, cache_dir=tmp_path, chunk=2)
    finally:
        write_digit_folder(digits, 7)
    assert len(list(tmp_path.iterdir())) == 2


def test_finetune_with_folder_data_caches_in_the_work_dir(digits, tmp_path):
    from bfq.pipeline.finetune import FinetuneConfig, run_finetune_stages
    from bfq.pipeline.models import resolve_model
    from bfq.quant.nn import quantize_unet
    from bfq.quant.recipe import uniform_recipe

    model = resolve_model("tiny-sd")
    quantize_unet(model.unet, uniform_recipe(model.unet, 2).bits, progress=False)
    cfg = FinetuneConfig(steps=1, batch_size=4, data=f"folder:{digits}", progress=False, t_sampling="uniform")
    run_finetune_stages(model, model.unet, stage1_steps=1, stage2_steps=0, config=cfg, work_dir=tmp_path)
    (cache,) = (tmp_path / "finetune" / "data").iterdir()
    assert json.loads((cache / "progress.json").read_text())["done"] == 7
    assert np.load(cache / "ehs.npy").shape == (7, 77, 64)
