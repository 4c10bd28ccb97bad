"""Model presets: tiny models survive a save/load round trip; `base` fails fast offline."""

import time

import numpy as np
import pytest
import torch

from pipeline import models
from pmu.errors import InputError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def test_tiny_detector_round_trip_through_ultralytics_checkpoint(tmp_path):
    path = models.save_tiny_detector(tmp_path / "tiny_yolo.pt")
    built = models.load_detector("tiny")
    loaded = models.load_detector("tiny", path=path)
    sd_built, sd_loaded = built.model.state_dict(), loaded.model.state_dict()
    assert sd_built.keys() == sd_loaded.keys()
    assert all(torch.equal(sd_built[k], sd_loaded[k]) for k in sd_built)
    assert loaded.names == built.names and loaded.names[0] == "person"
    kwargs = dict(imgsz=96, conf=0.0, max_det=5, verbose=False, device="cpu")
    a = built.predict([_image()], **kwargs)[0].boxes.data
    b = loaded.predict([_image()], **kwargs)[0].boxes.data
    assert a.shape[0] == 5 and torch.equal(a, b)


def test_tiny_clip_round_trip_through_open_clip_pretrained_path(tmp_path):
    path = models.save_tiny_clip(tmp_path / "tiny_clip.safetensors")
    built, preprocess, tokenizer = models.load_clip("tiny")
    loaded, _, _ = models.load_clip("tiny", path=path)
    tokens = tokenizer(["a man with a dog", "a red car"])
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(built.encode_text(tokens), loaded.encode_text(tokens))
        assert torch.equal(built.encode_image(pixels), loaded.encode_image(pixels))
    assert models.clip_identity("tiny", path)["weights"].startswith("sha256:")
    assert models.clip_identity("tiny")["weights"] == f"random-init-seed-{models.TINY_SEED}"


def test_tiny_hf_models_and_tokenizer_round_trip_through_from_pretrained(tmp_path):
    tokenizer = models.load_tokenizer("tiny")
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded_tok = models.load_tokenizer("tiny", path=tmp_path / "tok")
    text = ["A man walks his dog in Paris.", "unknownword xyz"]
    ids = tokenizer(text, padding=True, return_tensors="pt")
    assert torch.equal(
        ids["input_ids"], loaded_tok(text, padding=True, return_tensors="pt")["input_ids"]
    )
    assert (ids["input_ids"] != tokenizer.unk_token_id).sum() > 4  # the vocab was really read

    bert = models.load_text_encoder("tiny").eval()
    bert.save_pretrained(tmp_path / "bert")
    bert2 = models.load_text_encoder("tiny", path=tmp_path / "bert").eval()
    vit = models.load_vision_encoder("tiny").eval()
    vit.save_pretrained(tmp_path / "vit")
    vit2 = models.load_vision_encoder("tiny", path=tmp_path / "vit").eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(bert(**ids).last_hidden_state, bert2(**ids).last_hidden_state)
        assert torch.equal(
            vit(pixel_values=pixels).last_hidden_state, vit2(pixel_values=pixels).last_hidden_state
        )


def test_tiny_builds_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a = models.load_text_encoder("tiny").state_dict()
    b = models.load_text_encoder("tiny").state_dict()
    clip_a = models.load_clip("tiny")[0].state_dict()
    clip_b = models.load_clip("tiny")[0].state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(clip_a[k], clip_b[k]) for k in clip_a)
    det_a = models.load_detector("tiny").model.state_dict()
    det_b = models.load_detector("tiny").model.state_dict()
    assert all(torch.equal(det_a[k], det_b[k]) for k in det_a)


@pytest.mark.parametrize(
    "loader, hint",
    [
        (models.load_detector, "yolo11n.pt"),
        (models.load_clip, "ViT-B-32"),
        (models.load_text_encoder, "huggingface-cli download"),
        (models.load_vision_encoder, "huggingface-cli download"),
        (models.load_tokenizer, "huggingface-cli download"),
    ],
)
def test_base_preset_fails_fast_offline_with_instructions(loader, hint):
    start = time.perf_counter()
    with pytest.raises(models.WeightsUnavailable) as err:
        loader("base")
    assert time.perf_counter() - start < 5.0  # no network wait
    message = str(err.value)
    assert hint in message and "--preset tiny" in message


def test_missing_local_paths_raise_weights_unavailable(tmp_path):
    with pytest.raises(models.WeightsUnavailable, match="not found"):
        models.load_detector("tiny", path=tmp_path / "nope.pt")
    with pytest.raises(models.WeightsUnavailable, match="not found"):
        models.load_clip("tiny", path=tmp_path / "nope.safetensors")
    with pytest.raises(models.WeightsUnavailable, match="not found"):
        models.load_text_encoder("tiny", path=tmp_path / "nope")
    with pytest.raises(InputError, match="unknown preset"):
        models.get_preset("huge")
