"""Alignment made visible: the LLM words nearest to each projected patch feature, before and after Stage 1.

In the mini world the LM was pretrained to read, at an object's patch, the sum of its colour and position word
embeddings (``mini.lm_train``). A trained projection must therefore put those words nearest to the object's
patches; a random one must not.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from llava_lib import config, explain, plots  # noqa: E402

K = 8          # nearest tokens per patch, of the mini LM's ~130 live embedding rows
N_IMAGES = 6   # held-out images checked
MOST = 0.5     # "most patches"


@pytest.fixture(scope="module")
def before_after(mini_world, tmp_path_factory):
    """Nearest words of the first held-out images with a random projection, then after a short Stage 1 run."""
    from llava_lib.mini.build import held_out_scenes
    from llava_lib.mini.lm_train import image_word_regions
    from llava_lib.model.loading import build_model
    from llava_lib.train import TrainConfig, train

    paths = config.resolve("mini")
    torch.manual_seed(0)
    model, tok = build_model(paths, device="cpu")
    images, captions = explain.eval_images(paths, N_IMAGES)
    scenes = held_out_scenes(n=N_IMAGES)
    assert [s.caption for s in scenes] == captions     # the scenes are the eval images, in order
    regions = [image_word_regions(s, tok) for s in scenes]
    before = [explain.nearest_words(model, tok, im, k=K) for im in images]
    cfg = TrainConfig.for_profile("mini", out_dir=str(tmp_path_factory.mktemp("align")), max_steps=250,
                                  caption_eval_n=0, caption_show_n=0, eval_every=0, eval_limit=32, progress=False,
                                  tensorboard=False)
    train(cfg, model=model, tokenizer=tok)
    after = [explain.nearest_words(model, tok, im, k=K) for im in images]
    return tok, images, regions, before, after


def _shares(words, regions):
    """``{kind: [share of a region's patches with its word among the K nearest, ...]}`` over all regions."""
    out = {}
    for pw, regs in zip(words, regions):
        for _, patches, expected in regs:
            for kind, ids in expected.items():
                out.setdefault(kind, []).append(explain.word_share(pw, patches, ids, K))
    return out


@pytest.mark.slow
def test_colour_and_position_words_sit_on_the_objects_after_training_only(before_after):
    _, _, regions, before, after = before_after
    trained, untrained = _shares(after, regions), _shares(before, regions)
    assert set(trained) == {"颜色词", "位置词", "填充词 <|image_pad|>"}
    for kind in ("颜色词", "位置词"):
        # After training: on most patches of nearly every object, its own colour / position word is among the
        # K nearest (measured on 12 held-out images: 96% / 100% of the objects) ...
        assert np.mean([s >= MOST for s in trained[kind]]) >= 0.8, (kind, trained[kind])
        # ... and before training rarely (a random projection points nowhere in particular; measured ~0.1).
        assert np.mean(untrained[kind]) < 0.25, (kind, untrained[kind])
    # The background goes to the filler the LM reads between objects, which a random projection never hits.
    assert np.mean(trained["填充词 <|image_pad|>"]) >= 0.8 > 0.2 > np.mean(untrained["填充词 <|image_pad|>"])
    summary_after = explain.alignment_summary(after, regions, k=K)
    summary_before = explain.alignment_summary(before, regions, k=K)
    assert summary_after.count("✓") == 3 and summary_before.count("✗") == 3, (summary_after, summary_before)


@pytest.mark.slow
def test_report_and_grid_show_the_words(before_after):
    tok, images, regions, before, after = before_after
    assert after[0].n_candidates < 1000                          # only the live rows of 151,936 are searched
    assert len(after[0].ids) == 196 and all(len(r) == K for r in after[0].ids)
    assert all(s[0] >= s[-1] for s in after[0].scores)          # nearest first
    text = explain.alignment_report(after[0], regions[0], k=K)
    assert text.count("✓") > text.count("✗") and "个图块" in text, text
    untrained = explain.alignment_report(before[0], regions[0], k=K)
    assert untrained.count("✓") < text.count("✓"), (untrained, text)
    grid = plots.patch_word_grid(images[:1], [[w[:2] for w in after[0].tokens]], titles=["训练后"])
    markup = grid._repr_html_()
    assert markup.count("<img") == 1 and "repeat(14,1fr)" in markup and "训练后" in markup
    assert markup.count("<div style=\"border") == 196
    # The first object's position word (its first token, e.g. 左) is written on the grid.
    assert tok.decode(regions[0][0][2]["位置词"][:1]) in markup


def test_nearest_words_finds_an_embedding_row_written_as_a_patch(qwen_tokenizer):
    """A projection that writes embedding row t at every patch finds t first, with cosine 1, among the live rows."""
    from conftest import tiny_llava
    model = tiny_llava(qwen_tokenizer)
    emb = model.llm.get_input_embeddings().weight
    with torch.no_grad():
        emb[1000:] = 0                                            # only rows 0..999 live, as in the mini LM
        target = emb[321].clone()
        model.projector.weight.zero_()
        model.projector.bias.copy_(target)
    pw = explain.nearest_words(model, qwen_tokenizer, torch.zeros(3, 224, 224), k=3)
    assert pw.n_candidates == 1000 and len(pw.ids) == 14 * 14
    assert all(row[0] == 321 for row in pw.ids)
    assert pw.scores[0][0] == pytest.approx(1.0, abs=1e-5) and pw.tokens[0][0] == qwen_tokenizer.decode([321])


def test_word_share_and_report_count_patches():
    pw = explain.PatchWords(ids=[[1, 2], [3, 4], [2, 9]], tokens=[["a", "b"], ["c", "d"], ["b", "x"]],
                            scores=[[0.9, 0.1]] * 3, n_candidates=10)
    assert explain.word_share(pw, [0, 1, 2], [2]) == pytest.approx(2 / 3)
    assert explain.word_share(pw, [0, 1, 2], [2], k=1) == pytest.approx(1 / 3)
    assert explain.word_share(pw, [], [2]) == 0.0
    text = explain.alignment_report(pw, [("物体", [0, 2], {"词 b": [2], "词 c": [3]})])
    assert text == "物体（2 个图块）：词 b ✓（100%），词 c ✗（0%）"
    regions = [("物体", [0, 1], {"词 b": [2]}), ("另一个", [2], {"词 b": [9]})]
    assert explain.alignment_summary([pw], [regions]) == "词 b：过半的图块 ✓"          # 2 of 3 pooled
    assert explain.alignment_summary([pw], [regions], k=1) == "词 b：不到一半的图块 ✗"  # 1 of 3


def test_patch_word_grid_checks_its_input():
    from PIL import Image
    im = Image.new("RGB", (300, 200), (10, 200, 10))
    markup = plots.patch_word_grid([im], [["<红>", ["左", "<|image_pad|>", "上方"], ["<|image_pad|>", "左"], "\n\n"]],
                                   size=64)._repr_html_()
    assert "&lt;红&gt;" in markup and "左\n上方" in markup and "&#x27;\\n\\n&#x27;" in markup   # a blank token shows as its repr
    assert markup.count("·") == 1 and "repeat(2,1fr)" in markup
    with pytest.raises(ValueError, match="不一致"):
        plots.patch_word_grid([im], [])
    with pytest.raises(ValueError, match="n×n"):
        plots.patch_word_grid([im], [["a", "b", "c"]])
