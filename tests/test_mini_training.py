"""The mini world's training tricks, checked on their own (no build needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ChineseCLIPModel

from llava_lib.mini import clip_train as ct
from llava_lib.mini import scenes as sc
from llava_lib.process import IMAGE_PAD_ID


def test_grid_positions_make_neighbouring_patches_alike():
    vision = ChineseCLIPModel(ct.mini_clip_config(50)).vision_model
    ct.init_grid_positions(vision)
    pos = vision.embeddings.position_embedding.weight.detach()
    assert torch.count_nonzero(pos[0]) == 0  # [CLS] has no place on the grid
    grid = torch.nn.functional.normalize(pos[1:], dim=-1).view(14, 14, -1)
    near = (grid[5, 5] * grid[5, 6]).sum()
    far = (grid[5, 5] * grid[12, 0]).sum()
    assert near > 0.9 and far < near - 0.3, (near, far)
    # Every patch has its own position: no two rows coincide.
    d = torch.cdist(pos[1:], pos[1:]) + torch.eye(196) * 1e3
    assert d.min() > 1e-3
    assert vision.embeddings.position_embedding.weight.requires_grad


def test_mini_clip_is_wider_than_the_mini_llm():
    """As 768 -> 1024 in the real pair, the Stage 1 projection changes width; the geometry stays ViT-B/16's."""
    from llava_lib.mini.lm_train import mini_llm_config
    vision = ct.mini_clip_config(50).vision_config
    assert vision.hidden_size != mini_llm_config().hidden_size
    assert vision.hidden_size % vision.num_attention_heads == 0
    assert (vision.image_size // vision.patch_size) ** 2 + 1 == 197


def test_render_batch_is_the_rendered_scenes():
    scenes = sc.make_scenes(3, 11)
    batch = ct.render_batch(scenes)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.uint8
    for i, s in enumerate(scenes):
        assert np.array_equal(batch[i].permute(1, 2, 0).numpy(), np.asarray(sc.render(s)))


def test_clip_training_refuses_too_few_scenes(qwen_tokenizer, tmp_path):
    from llava_lib.mini.tokenizer import build_bert_tokenizer
    scenes = sc.make_scenes(10, 3)
    bert = build_bert_tokenizer([s.caption for s in scenes], tmp_path / "clip")
    with pytest.raises(ValueError, match="steps\\) \\* batch"):
        ct.train_clip(scenes, bert, steps=2, batch=8, text_steps=0, log=lambda *_: None)


def test_shape_noise_replaces_only_shape_words(qwen_tokenizer):
    from llava_lib.mini.lm_train import HintedLM, UsedVocab, word_ids

    used = set(qwen_tokenizer.all_special_ids)
    used |= {t for w in list(sc.COLORS) + list(sc.SHAPES) + list(sc.POSITIONS) for t in word_ids(qwen_tokenizer, w)}
    torch.manual_seed(0)
    lm = HintedLM(qwen_tokenizer, UsedVocab(used), hidden=16, layers=1)
    n = 4000
    color = torch.randint(0, len(sc.COLORS), (1, n))
    shape = torch.randint(0, len(sc.SHAPES), (1, n))
    cell = torch.randint(0, 4, (1, n))
    clean = lm.hints(color, shape, cell, noise=0.0, drop=0.0)
    torch.manual_seed(1)
    noisy = lm.hints(color, shape, cell, noise=0.0, drop=0.0, shape_noise=0.5)
    changed = (noisy - clean).abs().sum(-1) > 1e-6
    # Half the slots are redrawn, and a redraw picks the same shape 1 time in 5: 0.5 * 4/5 = 0.4 change.
    assert 0.35 < changed.float().mean() < 0.45, changed.float().mean()
    # What changed is exactly a shape word: the difference is (shape_new - shape_old) for some pair of shapes.
    shapes = lm.table[lm.shape_rows].detach()
    diffs = (shapes[:, None] - shapes[None]).view(-1, shapes.shape[-1])
    got = (noisy - clean)[changed]
    assert torch.cdist(got, diffs, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-5
    # Background slots never change.
    bg = lm.hints(torch.full((1, 8), -1), torch.full((1, 8), -1), torch.full((1, 8), -1), 0.0, 0.0, shape_noise=1.0)
    assert torch.allclose(bg, lm.table[lm.pad_row].expand_as(bg))


def test_outline_patches_are_the_partly_covered_object_patches():
    scene = sc.Scene((sc.SceneObject("红色", "正方形", 0, 56.0, 56.0, 40.0),), (230, 230, 230))
    owner, outline = sc.patch_layout(scene)
    assert outline.dtype == bool and not (outline & (owner < 0)).any()
    # A 68 px square from 22 to 90 px: patch rows/columns 2..4 lie wholly inside (32..80 px), so 3x3 interior.
    inside = (owner >= 0) & ~outline
    assert inside.sum() == 9, inside.reshape(14, 14).astype(int)
    rows, cols = np.nonzero(inside.reshape(14, 14))
    assert set(rows) == {2, 3, 4} and set(cols) == {2, 3, 4}
    # The CLIP's per-patch shape class and the LM's image words both leave the interior without a shape.
    targets = ct.patch_targets(scene)
    assert (targets[1][inside] == 0).all() and (targets[1][outline] > 0).all() and (targets[0][owner >= 0] > 0).all()


def test_lm_image_words_name_the_shape_only_on_outline_patches(qwen_tokenizer):
    from llava_lib.mini.lm_train import encode_corpus
    scenes = sc.make_scenes(12, 5)
    samples = encode_corpus(qwen_tokenizer, scenes, seed=0)
    seen = 0
    for scene, (_, _, with_image, color, shape, cell) in zip(scenes, samples):
        if not with_image:
            assert (color == -1).all() and (shape == -1).all()
            continue
        seen += 1
        owner, outline = sc.patch_layout(scene)
        assert color[0] == -1  # the [CLS] slot
        assert ((color[1:] >= 0) == (owner >= 0)).all()
        assert ((shape[1:] >= 0) == outline).all()
        assert ((cell[1:] >= 0) == (owner >= 0)).all()
    assert seen >= 3


def test_clip_word_targets_give_exactly_what_the_lm_reads(qwen_tokenizer):
    """The CLIP's read-out head regresses ``scenes.patch_words`` (no LM needed, so the two train in parallel);
    that is only sound if those rows times the LM's image-word matrix are exactly the LM's slot embeddings."""
    from llava_lib.mini.lm_train import HintedLM, UsedVocab, encode_corpus, hint_id, word_ids

    def image_word_matrix(llm):
        """One row per ``scenes.IMAGE_WORDS`` entry: a colour's or shape's first token, the sum of a position
        word's tokens, the filler."""
        emb = llm.get_input_embeddings().weight.detach()
        rows = [emb[hint_id(qwen_tokenizer, w)] for w in list(sc.COLORS) + list(sc.SHAPES)]
        rows += [emb[word_ids(qwen_tokenizer, w)].sum(0) for w in sc.POSITIONS]
        return torch.stack(rows + [emb[IMAGE_PAD_ID]])

    used = set(qwen_tokenizer.all_special_ids)
    used |= {t for w in list(sc.COLORS) + list(sc.SHAPES) + list(sc.POSITIONS) for t in word_ids(qwen_tokenizer, w)}
    torch.manual_seed(0)
    lm = HintedLM(qwen_tokenizer, UsedVocab(used), hidden=16, layers=1)
    words = image_word_matrix(lm.export())
    assert words.shape == (len(sc.IMAGE_WORDS), 16)
    scenes = sc.make_scenes(40, 8)
    checked = 0
    for scene, (_, _, with_image, color, shape, cell) in zip(scenes, encode_corpus(qwen_tokenizer, scenes, seed=1)):
        if not with_image:
            continue
        read = lm.hints(torch.from_numpy(color)[None], torch.from_numpy(shape)[None], torch.from_numpy(cell)[None],
                        noise=0.0, drop=0.0)[0, 1:]
        assert torch.allclose(torch.from_numpy(sc.patch_words(scene)) @ words, read, atol=1e-5)
        rows = sc.patch_words(scene)
        owner, outline = sc.patch_layout(scene)
        assert (rows[owner < 0] == np.eye(len(sc.IMAGE_WORDS))[-1]).all()       # background: the filler only
        assert (rows[owner >= 0].sum(1) == 2 + outline[owner >= 0]).all()       # colour + position (+ shape)
        checked += 1
    assert checked >= 10


@pytest.mark.slow
def test_lm_build_process_failure_names_the_cause_and_the_command(tmp_path):
    """The LM trains in a child process during the build; when it dies, the build says why and what to run."""
    import importlib
    build = importlib.import_module("llava_lib.mini.build")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    proc = build._LLMProcess(blocker, build.BuildSpec())  # the child cannot write its tokenizer under a file
    with pytest.raises(RuntimeError) as err:
        proc.wait()
    msg = str(err.value)
    assert "迷你 Qwen3 的训练进程失败" in msg and "python -m llava_lib.mini build" in msg
    assert "not-a-folder" in msg  # the child's own error (the path it could not write) is passed on


def test_corpus_encoding_equals_encoding_with_the_full_image_block(qwen_tokenizer):
    """encode_corpus renders a one-slot image block and widens it (3x cheaper); the ids and labels must be what
    the full 197-slot block gives through the same code the trainer uses."""
    from llava_lib.mini.corpus import conversation
    from llava_lib.mini.lm_train import encode_corpus
    from llava_lib.process import encode_conversation, num_image_tokens
    scenes = sc.make_scenes(40, 11)
    samples = encode_corpus(qwen_tokenizer, scenes, seed=3)
    rng = np.random.default_rng(3)  # encode_corpus draws the conversations from this stream, in order
    with_image = 0
    for scene, (ids, labels, has_image, *_) in zip(scenes, samples):
        conv, image = conversation(scene, rng)
        full_ids, full_labels = encode_conversation(qwen_tokenizer, conv, num_image_tokens(), learn_thinking=True)
        assert (ids, labels, has_image) == (full_ids[:320], full_labels[:320], image)
        with_image += image
        if image:
            assert ids.count(IMAGE_PAD_ID) == num_image_tokens()
    assert 10 <= with_image < len(scenes)


