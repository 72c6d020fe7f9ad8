"""What 04_stage1_training prints: parameter counts, one decoded training sample, eval images, the run folder."""
from __future__ import annotations

import dataclasses

import torch

from conftest import tiny_llava
from llava_lib import config, explain, process


def test_parameter_table_counts_only_the_projection_as_trainable(qwen_tokenizer):
    model = tiny_llava(qwen_tokenizer)
    rows = explain.parameter_counts(model)
    assert [r[0].split()[0] for r in rows] == ["视觉塔", "投影层", "语言模型"]
    (_, nv, tv), (_, np_, tp), (_, nl, tl) = rows
    assert tv == 0 and tl == 0 and tp == np_ == 32 * 32 + 32  # Linear 32 -> 32
    assert nv == sum(p.numel() for p in model.vision.parameters())
    text = explain.parameter_table(model)
    assert f"{np_:,}" in text and "冻结" in text and "训练" in text
    assert f"{np_ / (nv + np_ + nl):.3%}" in text


def test_text_only_model_has_no_projection(qwen_tokenizer):
    model = tiny_llava(qwen_tokenizer)
    model.vision, model.projector = None, None
    assert [r[1] for r in explain.parameter_counts(model)][:2] == [0, 0]


def test_describe_sample_shows_the_image_block_and_the_loss_span(qwen_tokenizer):
    samples = [{"pixel_values": torch.zeros(3, 224, 224), "caption": "图中有一个物体：中间是一个红色的圆形。"},
               {"pixel_values": torch.zeros(3, 224, 224), "caption": "短"}]
    batch = process.collate(qwen_tokenizer, samples, 197)
    text = explain.describe_sample(batch, qwen_tokenizer, 1)  # the shorter, right-padded one
    assert "<|vision_start|><|image_pad|> × 197<|vision_end|>" in text
    assert "⟦短<|im_end|>⟧" in text
    assert "请描述这张图片。" in text and "<|endoftext|>" not in text  # padding left out
    assert "图片块：第 3–201 个词元" in text  # <|im_start|> user \n, then the block
    first = explain.describe_sample(batch, qwen_tokenizer, 0)
    assert "⟦图中有一个物体：中间是一个红色的圆形。<|im_end|>⟧" in first
    n_loss = int((batch["labels"][0] != -100).sum())
    assert f"计算损失的词元 {n_loss} 个" in first
    assert len(first.splitlines()[-1].split(" | ")) == n_loss


def test_fold_image_block_without_image_is_identity():
    assert explain._fold_image_block("<|im_start|>user\n你好<|im_end|>") == "<|im_start|>user\n你好<|im_end|>"


def test_notebook_stage1_dir_is_per_profile(tmp_path):
    mini = config.resolve("mini", checkpoints_dir=tmp_path)
    full = config.resolve("full", checkpoints_dir=tmp_path)
    assert explain.notebook_stage1_dir(mini) == tmp_path / "stage1-mini-notebook"
    assert explain.notebook_stage1_dir(full) == tmp_path / "stage1-full-notebook"


def test_eval_images_come_from_the_eval_split_or_the_train_tail(mini_world, tmp_path):
    root, _ = mini_world
    paths = config.resolve("mini")
    images, captions = explain.eval_images(paths, 3)
    assert len(images) == 3 and images[0].size == (224, 224)
    from llava_lib.data import CachedImageDataset
    assert captions == CachedImageDataset(paths.cache_dir / "eval", transform=None).captions[:3]
    # Without an eval split: the last rows of the train cache (held out by train()).
    (tmp_path / "train").symlink_to(paths.cache_dir / "train", target_is_directory=True)
    no_eval = dataclasses.replace(paths, cache_dir=tmp_path)
    images, captions = explain.eval_images(no_eval, 2)
    train_caps = CachedImageDataset(paths.cache_dir / "train", transform=None).captions
    assert captions == train_caps[-2:]


def test_tensorboard_routes_name_what_works_remotely():
    from llava_lib.explain import tensorboard_routes
    local = tensorboard_routes("/runs/tb", environ={}, has_server_proxy=False)
    assert "同一台机器" in local and "空白" not in local
    remote = tensorboard_routes("/runs/tb", port=6010, environ={"SSH_CONNECTION": "1.2.3.4 5 6.7.8.9 22"},
                                has_server_proxy=False)
    assert "空白" in remote and "/proxy/6010/" in remote and "ssh -L 6010:localhost:6010" in remote
    assert "pip install jupyter-server-proxy" in remote and "/runs/tb" in remote
    assert "已安装" in tensorboard_routes("/x", environ={"JUPYTERHUB_API_URL": "http://hub"}, has_server_proxy=True)


def test_real_size_model_counts_without_weights():
    """The real run's table, built from the published configs on the meta device (no download)."""
    from llava_lib.explain import parameter_counts, real_size_model
    model = real_size_model()
    counts = {name: (n, t) for name, n, t in parameter_counts(model)}
    proj = [v for k, v in counts.items() if "projector" in k][0]
    assert proj == (768 * 1024 + 1024, 768 * 1024 + 1024) == (787_456, 787_456)
    llm = [v for k, v in counts.items() if "Qwen3" in k][0]
    assert 0.59e9 < llm[0] < 0.60e9 and llm[1] == 0  # Qwen3-0.6B: 0.44B non-embedding + 151,936 x 1,024 embedding
    assert model.num_image_tokens == 197 and model.vision.hidden_size == 768
