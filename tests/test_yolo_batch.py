"""The fast detect path (uint8 letterbox batches, fused raw model, batched NMS) against
ultralytics' own `YOLO.predict`: same model inputs, and the same boxes, classes and confidences.

Tolerance: none. On CPU, at the same torch thread count, the fast path reproduces predict's
rows bit for bit (the same fused model runs on the same uint8 input; NMS sees the same float32
boxes with ultralytics' class offset; box scaling repeats its arithmetic). The random `tiny`
detector's scores are ~1e-4 and tied, so the end-to-end check also uses a detector whose
BatchNorm statistics were calibrated on random images (separated, content-dependent scores),
saved with ultralytics' own format and loaded through pipeline.models.load_detector.
"""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ultralytics.data.augment import LetterBox
from ultralytics.utils import NUM_THREADS, ops

from pipeline import yolo_batch
from pipeline.detect import detect_objects
from pipeline.models import load_detector
from pipeline.settings import DetectParams, DetectSettings

SHAPES = [(60, 200), (200, 60), (123, 77), (1, 400), (400, 1), (640, 480), (31, 33), (300, 300)]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("auto", [False, True])
@pytest.mark.parametrize("new_shape", [(320, 320), (64, 64), (640, 640)])
def test_letterbox_equals_ultralytics(auto, new_shape):
    for k, (h, w) in enumerate(SHAPES):
        rgb = _image(h, w, k)
        expected = LetterBox(new_shape, auto=auto, stride=32)(image=rgb[:, :, ::-1].copy())
        resized = yolo_batch.resize_for_letterbox(rgb, new_shape)
        top, bottom, left, right = yolo_batch.letterbox_padding((h, w), new_shape, auto, 32)
        ours = np.full((top + resized.shape[0] + bottom, left + resized.shape[1] + right, 3), 114)
        ours[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
        np.testing.assert_array_equal(ours.astype(np.uint8), expected[:, :, ::-1])


class _InputCapture:
    """Records the tensors YOLO's model forward receives (class-level patch, any caller)."""

    def __enter__(self):
        from ultralytics.nn.tasks import BaseModel

        self.inputs, self._original = [], BaseModel.forward
        capture = self

        def forward(module, x, *args, **kwargs):
            capture.inputs.append(x.detach().clone())
            return capture._original(module, x, *args, **kwargs)

        BaseModel.forward = forward
        return self

    def __exit__(self, *exc):
        from ultralytics.nn.tasks import BaseModel

        BaseModel.forward = self._original


@pytest.mark.parametrize("shapes", [[(90, 120)] * 3, [(90, 120), (120, 90), (50, 200)]])
def test_model_input_of_a_batch_equals_predict(shapes):
    """Equal shapes get predict's minimum rectangle, mixed shapes the square: same tensor."""
    yolo = load_detector("tiny")
    images = [_image(h, w, k) for k, (h, w) in enumerate(shapes)]
    with _InputCapture() as cap:
        yolo.predict(
            [im[:, :, ::-1].copy() for im in images], imgsz=128, device="cpu", verbose=False
        )
    collate = yolo_batch.LetterboxCollate((128, 128), 32)
    items = [
        (k, yolo_batch.resize_for_letterbox(im, (128, 128)), im.shape[:2], None)
        for k, im in enumerate(images)
    ]
    ours = yolo_batch.to_model_input(collate(items)["pixels"])
    assert torch.equal(ours, cap.inputs[-1])
    assert ours.shape[2:] == ((96, 128) if len(set(shapes)) == 1 else (128, 128))


def _calibrated_detector(path):
    """The tiny YOLO with BatchNorm statistics taken from random images, so that activations
    do not vanish and scores are separated; saved in ultralytics' format (fp16 weights)."""
    yolo = load_detector("tiny")
    net = yolo.model
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, 3, 160, 160, generator=gen))
    net.eval()
    for branch in net.model[-1].cv3:  # class logits: moderate, not saturated
        branch[-1].weight.data *= 0.05
        branch[-1].bias.data.fill_(-1.0)
    yolo.save(str(path))
    return path


@pytest.fixture(scope="module")
def sample_pairs(tmp_path_factory):
    from pipeline.prepare import prepare
    from pipeline.readers.sample import read_sample

    root = tmp_path_factory.mktemp("yolo-sample")
    prepare(read_sample(), root / "prepared", negatives=False, progress=False)
    return root / "prepared" / "pairs.parquet", _calibrated_detector(root / "calibrated.pt")


@pytest.mark.parametrize(
    "detector, conf, batch_size",
    [("calibrated", 0.25, 8), ("calibrated", 0.6, 1), ("tiny", 0.0, 4)],
)
def test_fast_detect_equals_ultralytics_predict(sample_pairs, tmp_path, detector, conf, batch_size):
    pairs, calibrated = sample_pairs
    path = calibrated if detector == "calibrated" else None
    tables = {}
    for impl in ("fast", "ultralytics"):
        out = tmp_path / f"{impl}.parquet"
        params = DetectParams(batch_size=batch_size, imgsz=320, conf=conf, top_k=10, impl=impl)
        # predict sets torch to ultralytics' NUM_THREADS; conv results depend on the count.
        settings = DetectSettings(
            pairs=str(pairs), out=str(out), detector=str(path) if path else None, params=params
        )
        detect_objects(settings, progress=False, threads=NUM_THREADS)
        tables[impl] = pq.read_table(out).drop(["error"]).to_pylist()
    fast, reference = tables["fast"], tables["ultralytics"]
    assert sum(len(r["boxes"]) for r in fast) > 50
    if detector == "calibrated":
        assert len({c for r in fast for c in r["confs"]}) > 50  # separated scores
    assert fast == reference  # boxes, classes, confidences: bit-identical


def test_grouped_nms_equals_nms_per_image():
    """The multi-image calls (float64 per-image offsets, used on CUDA) keep what one call per
    image keeps, and top_k_per_image keeps each image's best."""
    gen = torch.Generator().manual_seed(1)
    n_images, per = 5, 300
    image = torch.arange(n_images).repeat_interleave(per)
    xy = torch.rand(n_images * per, 2, generator=gen) * 600
    wh = torch.rand(n_images * per, 2, generator=gen) * 120 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n_images * per, generator=gen)
    classes = torch.randint(0, 3, (n_images * per,), generator=gen)
    single = yolo_batch.batched_nms(image, boxes, scores, classes, 0.5, n_images, 0)
    grouped = yolo_batch.batched_nms(image, boxes, scores, classes, 0.5, n_images, 700)
    assert torch.equal(single, grouped)
    assert (image[single].diff() >= 0).all()
    top = yolo_batch.top_k_per_image(image, single, 4)
    assert torch.bincount(image[top]).tolist() == [4] * n_images
    for b in range(n_images):
        kept = single[image[single] == b]
        assert torch.equal(top[image[top] == b], kept[:4])
        assert (scores[kept].diff() <= 0).all()


def test_pre_nms_cap_keeps_the_result_when_enough_boxes_survive():
    """Greedy NMS decides a box from higher-scoring boxes only: capping the candidates to the
    top N changes nothing while the top N hold top_k survivors."""
    gen = torch.Generator().manual_seed(2)
    preds = torch.rand(2, 4 + 5, 2000, generator=gen)
    preds[:, :2] *= 300
    preds[:, 2:4] = preds[:, 2:4] * 60 + 2
    hw = torch.tensor([[320, 320], [200, 300]])
    full = yolo_batch.postprocess(preds, hw, (320, 320), 0.1, 0.5, 10, 30000)
    capped = yolo_batch.postprocess(preds, hw, (320, 320), 0.1, 0.5, 10, 40)
    for a, b in zip(full, capped, strict=True):
        assert torch.equal(a, b)
    assert full[0].tolist() == [0] * 10 + [1] * 10


def test_scale_boxes_equals_ultralytics():
    gen = torch.Generator().manual_seed(3)
    for h0, w0 in [(480, 640), (77, 123), (1, 400), (999, 13)]:
        boxes = torch.rand(20, 4, generator=gen) * 700 - 30
        expected = ops.scale_boxes((640, 640), boxes.clone(), (h0, w0))
        ours = yolo_batch.scale_boxes(boxes, (640, 640), torch.tensor([[h0, w0]] * 20))
        assert torch.equal(ours, expected)


def test_fp32_head_wrapper_is_transparent_outside_autocast():
    """On CUDA the head runs outside bf16 autocast; without autocast the wrapper changes
    nothing (the CPU check of the code path CUDA runs)."""
    net, _ = yolo_batch.fused_network(load_detector("tiny"), torch.device("cpu"))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        before = net(x)[0]
        yolo_batch._fp32_head(net)
        assert torch.equal(net(x)[0], before)
