"""CLIP matching over a folder (02_clip_matching): embeddings, cosine similarities, top-k, the example folder."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_lib import retrieval
from llava_lib.retrieval import ClipMatcher, Match, cosine_similarities, read_examples, retrieval_accuracy, top_k

CAPTIONS = ["图中有一个物体：中间是一个红色的圆形。", "图中有两个物体：左上方是一个蓝色的正方形，右下方是一个黄色的星形。",
            "一只猫", "一条狗"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight ChineseCLIPModel at a tiny width, saved with its processor (the real classes)."""
    from transformers import ChineseCLIPModel, ChineseCLIPProcessor
    try:
        from transformers import ChineseCLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import ChineseCLIPImageProcessor as ImageProcessor

    from llava_lib.mini.clip_train import mini_clip_config
    from llava_lib.mini.tokenizer import build_bert_tokenizer
    out = tmp_path_factory.mktemp("tiny_clip")
    tok = build_bert_tokenizer(CAPTIONS, out)
    torch.manual_seed(0)
    ChineseCLIPModel(mini_clip_config(len(tok), width=32, layers=1)).save_pretrained(out)
    ip = ImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ChineseCLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


def _images():
    return [Image.new("RGB", (224, 224), c) for c in ((215, 38, 38), (38, 82, 215), (236, 196, 24))] + \
        [Image.new("RGB", (300, 200), (30, 30, 30))]


def test_embeddings_are_unit_length_and_deterministic(tiny_clip_dir):
    m = ClipMatcher.from_pretrained(tiny_clip_dir, device="cpu")
    imgs = _images()
    a = m.encode_images(imgs, batch_size=3)
    b = m.encode_images([imgs[1]])
    assert a.shape == (4, m.model.config.projection_dim) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(a[1], b[0], atol=1e-5, rtol=1e-5)  # batching does not change an embedding
    t = m.encode_texts(CAPTIONS, batch_size=2)
    assert t.shape == (4, m.model.config.projection_dim)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(4))
    scores = m.text_scores(CAPTIONS[:2], a)
    assert scores.shape == (2, 4) and float(scores.abs().max()) <= 1.0 + 1e-5
    torch.testing.assert_close(scores, cosine_similarities(t[:2], a))


def test_long_texts_are_cut_to_the_model_limit(tiny_clip_dir):
    m = ClipMatcher.from_pretrained(tiny_clip_dir, device="cpu", max_text_tokens=1000)
    assert m.max_text_tokens == m.model.config.text_config.max_position_embeddings
    assert m.encode_texts(["红" * 500]).shape[0] == 1


def test_cosine_similarities_and_top_k():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    s = cosine_similarities(q, g)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.70710677, 0.0], [0.0, 0.70710677, 1.0]]))
    assert top_k(s[0], 2) == [Match(0, 1.0), Match(1, pytest.approx(0.70710677))]
    assert [m.index for m in top_k([0.5, 0.9, 0.5, 0.9], 4)] == [1, 3, 0, 2]  # ties: lower index first
    assert len(top_k([0.1, 0.2], 5)) == 2


def test_retrieval_accuracy_uses_the_diagonal():
    assert retrieval_accuracy(torch.eye(4)) == 1.0
    s = torch.eye(4)
    s[0] = torch.tensor([0.1, 0.9, 0.0, 0.0])
    assert retrieval_accuracy(s) == 0.75
    assert retrieval_accuracy(s, k=2) == 1.0


def test_read_examples(tmp_path):
    for i, cap in enumerate(["第一张", None, "第三张"]):
        Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(tmp_path / f"{i:04d}.jpg")
        if cap:
            (tmp_path / f"{i:04d}.txt").write_text(cap + "\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("x")
    ex = read_examples(tmp_path)
    assert ex.names == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert ex.captions == ["第一张", "", "第三张"]
    assert ex.image(2).size == (32, 32) and len(ex.images()) == 3
    with pytest.raises(FileNotFoundError, match="python -m llava_lib.mini examples"):
        read_examples(tmp_path / "missing")


def test_mini_clip_finds_the_image_of_a_caption(mini_world):
    """The processor saved with the mini CLIP preprocesses like its training: text -> image top-1 within galleries
    of 10 images is far above chance (0.1), as in the builder's own check."""
    root, _ = mini_world
    import json

    from llava_lib.mini import scenes
    seed = json.loads((root / "build.json").read_text(encoding="utf-8"))["spec"]["seed"]
    n, gallery = 60, 10
    captions = [s.caption for s in scenes.make_scenes(n, seed + 1)]
    images = [Image.open(root / "images" / "eval" / f"{i:06d}.jpg").convert("RGB") for i in range(n)]
    m = ClipMatcher.from_pretrained(root / "clip", device="cpu")
    text_emb, image_emb = m.encode_texts(captions), m.encode_images(images)
    hits = 0
    for g in range(0, n, gallery):
        scores = cosine_similarities(text_emb[g:g + gallery], image_emb[g:g + gallery])
        # A caption that two images share: either image is a right answer.
        hits += sum(captions[g + top_k(scores[i], 1)[0].index] == captions[g + i] for i in range(len(scores)))
    assert hits / n >= 0.6, hits


def test_matching_uses_the_training_geometry(tiny_clip_dir):
    """A 3:2 photo is squashed whole to 224x224 for matching, as for training and chat (no centre crop)."""
    from llava_lib.process import IMAGE_SIZE, clip_transform
    m = ClipMatcher.from_pretrained(tiny_clip_dir, device="cpu")
    wide = Image.new("RGB", (300, 200), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 60, 200))  # a blue band at the left edge, which a centre crop would cut off
    pixels = clip_transform(wide)
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert float(pixels[2, :, :20].mean()) > float(pixels[0, :, :20].mean())  # the band is still there, at the left
    expected = torch.nn.functional.normalize(
        m.model.get_image_features(pixel_values=pixels[None]).pooler_output.float(), dim=-1)
    torch.testing.assert_close(m.encode_images([wide]), expected, atol=1e-5, rtol=1e-5)
