"""The full profile rehearsed at real sizes from random weights, offline (``python tests/rehearsal.py``).

The slow test runs the whole rehearsal (a few minutes on 2 quiet CPU cores; ~3 GB in a temporary directory) and
then checks what it wrote against the real downloads' layouts; the fast ones check the command around it.
"""
from __future__ import annotations

import json
import math
import socket
import tempfile
from pathlib import Path

import pytest

import rehearsal as rh


@pytest.mark.slow
def test_full_rehearsal(record_property, capsys):
    with tempfile.TemporaryDirectory(prefix="llava-rehearsal-test-") as tmp:  # removed even when a check fails
        result = rh.rehearse(Path(tmp))
        timings = result["timings"]
        record_property("rehearsal_timings", json.dumps(timings, ensure_ascii=False))
        with capsys.disabled():
            print("\n" + "\n".join(f"  {s:7.1f} 秒  {t}" for t, s in timings) + f"\n  {sum(s for _, s in timings):7.1f} 秒  合计")
        assert len(timings) == 7 and all(s > 0 for _, s in timings)
        _check_outputs(result["outputs"], result["losses"])
        _check_clip(Path(tmp) / "models" / "multi-modal_clip-vit-base-patch16_zh", Path(tmp) / "home")
        _check_qwen(Path(tmp) / "models" / "Qwen3-0.6B")
        _check_data(Path(tmp))
        port = int(timings[2][0].split("127.0.0.1:")[1].split(" ")[0])
        with pytest.raises(OSError):  # the image server was stopped
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _check_outputs(outputs, losses):
    assert "本次失败 3 行" in outputs["prepare"] and "[http_404]：1" in outputs["prepare"]
    assert "转换完成" in outputs["train"] and "转换完成" not in outputs["resume"]
    assert "从检查点" in outputs["resume"] and "（第 2 步）" in outputs["resume"]
    assert "回答（结束原因 length）" in outputs["chat"] and "temperature=0.6" in outputs["chat"]
    assert len(losses) == 3 and all(math.isfinite(x) and 5 < x < 20 for x in losses)  # ~ln(151936) = 11.9


def _check_clip(d: Path, home: Path):
    """ModelScope's own loader reads the directory (strict), with BERT's special-token ids; converted once."""
    from modelscope.models.multi_modal.clip.model import CLIPForMultiModalEmbedding
    lines = (d / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 21128 == len(set(lines))
    ms = CLIPForMultiModalEmbedding(str(d))
    assert [ms.tokenizer.vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    v = ms.clip_model.visual
    assert (v.conv1.weight.shape, v.proj.shape, len(v.transformer.resblocks)) == ((768, 3, 16, 16), (768, 512), 12)
    assert ms.clip_model.bert.embeddings.word_embeddings.weight.shape == (21128, 768)
    assert len(list((home / "converted").iterdir())) == 1


def _check_qwen(d: Path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    cfg = AutoConfig.from_pretrained(d)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (1024, 28, 16, 8, 128, 3072, 151936)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 1000000
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.max_position_embeddings) == (151645, 151643, 40960)
    gen = GenerationConfig.from_pretrained(d)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.eos_token_id, gen.pad_token_id) == (
        True, 0.6, 0.95, 20, [151645, 151643], 151643)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" not in names  # tied, as published
        assert sum(math.prod(f.get_slice(n).get_shape()) for n in names) == 596_049_920
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    tok = AutoTokenizer.from_pretrained(d)
    assert (len(tok), tok.eos_token_id, tok.pad_token_id) == (151669, 151645, 151643)
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _check_data(root: Path):
    import pyarrow.parquet as pq
    shards = sorted((root / "SA1B-Dense-Caption" / "data").glob("*.parquet"))
    assert len(shards) == 2
    table = pq.read_table(shards[0])
    assert table.column_names == ["url", "cap_seg"] and table.num_rows == rh.TRAIN_ROWS
    caption = json.loads(table.column("cap_seg")[0].as_py())["global_caption"]
    assert len(caption) >= 200
    counts = {part: pq.read_metadata(next((root / "image_cache" / part).glob("part-*.parquet"))).num_rows
              for part in ("train", "eval")}
    assert counts == {"train": rh.LIMIT - 3, "eval": rh.EVAL_LIMIT - 1}


# ------------------------------------------------------------------------------------------ the command


def test_command_removes_its_temporary_directory_and_prints_timings(monkeypatch, capsys):
    seen = []

    def fake(root):
        seen.append(root)
        (root / "x").write_text("1")
        return {"timings": [("写 Qwen3-0.6B", 1.5)], "outputs": {}, "losses": [], "root": root}

    monkeypatch.setattr(rh, "rehearse", fake)
    assert rh.main([]) == 0
    assert seen and not seen[0].exists()
    out = capsys.readouterr().out
    assert "预演通过" in out and "1.5 秒  写 Qwen3-0.6B" in out


def test_command_keeps_dir_and_reports_a_failed_step(monkeypatch, tmp_path, capsys):
    def fail(root):
        raise rh.RehearsalError("训练失败（退出码 2）")

    monkeypatch.setattr(rh, "rehearse", fail)
    assert rh.main(["--dir", str(tmp_path / "r")]) == 1
    assert "预演失败：训练失败（退出码 2）" in capsys.readouterr().err
    monkeypatch.setattr(rh, "rehearse", lambda root: {"timings": [], "outputs": {}, "losses": [], "root": root})
    (tmp_path / "r").mkdir()
    assert rh.main(["--dir", str(tmp_path / "r")]) == 0 and (tmp_path / "r").is_dir()
    assert f"文件保留在 {tmp_path / 'r'}" in capsys.readouterr().out


def test_vocab_has_bert_specials_at_bert_ids():
    vocab = rh.bert_vocab()
    assert len(vocab) == rh.CLIP_TEXT["vocab_size"] == 21128 and len(set(vocab)) == len(vocab)
    assert [vocab.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "old.txt").write_text("上一次的文件")
    with pytest.raises(rh.RehearsalError, match="不为空"):
        rh.rehearse(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]
