"""--dataset text: tokenizers, windows, the Transformer and LSTM, GPT init, generation, exact
resume after SIGKILL, whole-split validation, and every new flag's bad values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATASETS
from test_bad_input import run_main
from test_distributed import free_port
from trainkit.exits import EXIT_USAGE
from trainkit.config.files import recipe_config
from trainkit.errors import ConfigError, DataError
from trainkit.nn.init import GPT_STD, init_weights
from trainkit.checkpoint.export import export_safetensors, load_safetensors
from trainkit.recipes.run import train_run
from trainkit.recipes.text import data as text_data
from trainkit.recipes.text import tokenizers as text_tokenizers
from trainkit.recipes.text.data import RandomWindows, load_text, read_text, validation_batches, window_pairs
from trainkit.recipes.text.generate import generate
from trainkit.recipes.text.models import LSTMLanguageModel, Transformer, parameter_count
from trainkit.recipes.text.tokenizers import (
    UNKNOWN_CHAR, ByteTokenizer, CharTokenizer, tokenizer_from_state, train_tokenizer,
)  # fmt: skip

KJV = SHARED_DATASETS / "text" / "kjv.txt"
UNICODE = "Grüße, 世界! naïve café — ünïcødé\nsecond line\n"
TINY = ["--layers", "2", "--heads", "2", "--width", "32", "--block-size", "32", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """The first 60,000 characters of the KJV: big enough to learn from, small enough to be quick."""
    path = tmp_path_factory.mktemp("text") / "kjv-start.txt"
    with open(KJV, encoding="utf-8") as source:
        path.write_text(source.read(60_000), encoding="utf-8")
    return path


# ------------------------------------------------------------------ tokenizers
@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizers_round_trip_text_they_know(kind):
    pytest.importorskip("tokenizers") if kind == "bpe" else None
    tokenizer = train_tokenizer(kind, UNICODE * 20, vocab_size=300 if kind == "bpe" else None)
    ids = tokenizer.encode(UNICODE)
    assert tokenizer.decode(ids) == UNICODE
    assert 0 <= ids.min() and ids.max() < tokenizer.vocab_size
    again = tokenizer_from_state(json.loads(json.dumps(tokenizer.state_dict())))  # plain data, as checkpoints hold it
    assert (again.encode(UNICODE) == ids).all() and again.vocab_size == tokenizer.vocab_size


def test_char_vocabulary_comes_from_the_training_text_and_unknown_characters_still_encode():
    tokenizer = CharTokenizer.train("abcab")
    assert tokenizer.chars == "abc" and tokenizer.vocab_size == 4
    ids = tokenizer.encode("abz€a")
    assert ids.tolist() == [0, 1, 3, 3, 0]
    assert tokenizer.decode(ids) == f"ab{UNKNOWN_CHAR}{UNKNOWN_CHAR}a"


def one_pass_char_ids(tokenizer: CharTokenizer, text: str) -> np.ndarray:
    """The char tokenizer's encoding before it went piece by piece: the whole text at once."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.minimum(np.searchsorted(tokenizer._codepoints, codepoints), len(tokenizer._codepoints) - 1)
    return np.where(tokenizer._codepoints[ids] == codepoints, ids, tokenizer.unknown_id).astype(np.int32)


def test_encoding_piece_by_piece_gives_the_ids_of_one_pass(monkeypatch):
    text = (UNICODE + "☃ 日本語 \x00 z") * 40  # characters outside the vocabulary fall in every piece
    char = CharTokenizer.train(UNICODE)
    whole = char.encode(text)
    monkeypatch.setattr(text_tokenizers, "CODE_POINT_CHUNK", 7)
    pieces = char.encode(text)
    assert pieces.dtype == np.int32 and np.array_equal(pieces, whole)
    assert np.array_equal(pieces, one_pass_char_ids(char, text))
    assert char.encode("").tolist() == []
    pytest.importorskip("tokenizers")
    bpe = train_tokenizer("bpe", KJV.read_text(encoding="utf-8")[:50_000], vocab_size=300)
    lines = KJV.read_text(encoding="utf-8")[:200_000]  # 128 pieces of 256 lines
    batched = bpe.encode(lines)
    monkeypatch.setattr(text_tokenizers, "BPE_BATCH", 10**9)
    assert np.array_equal(batched, bpe.encode(lines)) and batched.dtype == np.int32


def test_byte_tokenizer_has_every_byte_and_bpe_compresses():
    assert ByteTokenizer().encode("é").tolist() == [0xC3, 0xA9]
    pytest.importorskip("tokenizers")
    text = KJV.read_text(encoding="utf-8")[:100_000]
    bpe = train_tokenizer("bpe", text, vocab_size=512)
    assert bpe.vocab_size == 512
    assert len(bpe.encode(text)) < 0.6 * len(text)  # merges learned: far fewer tokens than characters


def test_a_stored_tokenizer_that_is_not_ours_is_one_line():
    for state in (None, {"kind": "char"}, {"kind": "sentencepiece"}, "char"):
        with pytest.raises(ConfigError, match="not one trainkit wrote"):
            tokenizer_from_state(state)


# ------------------------------------------------------------- split and windows
def test_split_is_by_position_and_the_tokenizer_sees_only_the_training_part(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a" * 90 + "z" * 10, encoding="utf-8")
    data = load_text(path, val_fraction=0.1, block_size=4)
    assert data.tokenizer.chars == "a"  # 'z' appears only in the validation part
    assert data.train.tolist() == [0] * 90 and data.val.tolist() == [data.tokenizer.unknown_id] * 10


def test_a_byte_order_mark_is_not_text_and_error_bytes_count_from_the_file_start(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_text(path) == "hello\n"
    path.write_bytes(b"\xef\xbb\xbf \n")
    with pytest.raises(DataError, match=f"^--data-file {path} holds no text$"):
        read_text(path)
    path.write_bytes(b"\xef\xbb\xbfab\xe9")
    with pytest.raises(DataError, match=r"is not UTF-8 text \(byte 5 is 0xe9\)"):
        read_text(path)


def test_text_of_control_characters_is_refused_above_a_tenth_or_at_a_block_of_nul(tmp_path):
    path = tmp_path / "t.txt"

    def refusal(text: str) -> str | None:
        path.write_text(text, encoding="utf-8")
        try:
            read_text(path)
        except DataError as exc:
            return str(exc)
        return None

    assert refusal("a" * 9000 + "\x1b" * 1000) is None  # a tenth: terminal colours in a log, say
    assert refusal("a" * 9000 + "\x1b" * 1001) == (
        f"--data-file {path} is not text: 1,001 of its 10,001 characters are control characters (0 NUL); "
        "is it binary or a sparse/zeroed file?")  # fmt: skip
    assert refusal("a" * 10 + "\t\n\f\r" * 1000) is None  # layout, not control
    assert "2,000 of its 10,000 characters are control characters" in refusal("a" * 8000 + "\x85\x7f" * 1000)
    assert refusal("a" * 100_000 + "\x00" * 4095) is None
    assert "(4,096 NUL)" in refusal("a" * 100_000 + "\x00" * 4096)  # 4%, but a block of zeros


def test_a_file_larger_than_the_memory_available_is_refused_before_it_is_read(tmp_path, monkeypatch, capsys):
    path = tmp_path / "big.txt"
    path.write_text("word " * 100_000, encoding="utf-8")  # 488 KiB: about 3.8 MiB loaded
    monkeypatch.setattr(text_data, "available_memory_bytes", lambda: 2 * 1024**2)
    monkeypatch.setattr(text_data, "read_bytes", lambda path: pytest.fail("read before the memory check"))
    code, output = run_main(["train", "--dataset", "text", "--data-file", str(path), "--out", str(tmp_path / "run")],
                            capsys)  # fmt: skip
    assert code == EXIT_USAGE and len(output.strip().splitlines()) == 1
    assert (f"--data-file {path} is 0.5 MiB; reading and encoding it (--tokenizer char) needs about 3.8 MiB of "
            "memory but 2.0 MiB is available; train on part of it") in output  # fmt: skip
    assert not (tmp_path / "run" / "config.json").exists()


def test_loading_text_peaks_at_a_few_times_the_file():
    """The ids (4 bytes a character) and the text's split copies, not a whole-file utf-32 copy and
    int64 search positions (24x the file before)."""
    tracemalloc.start()
    try:
        data = load_text(KJV, block_size=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = KJV.stat().st_size
    assert len(data.train) + len(data.val) == size  # ASCII: a character a byte
    assert peak < 6 * size, f"peak {peak / size:.1f}x the file"


def test_random_windows_are_seeded_per_batch_and_resume_exactly():
    ids = torch.arange(10_000, dtype=torch.int32)
    windows = RandomWindows(ids, block_size=16, batch_size=4, seed=7)
    epoch = list(windows.epoch(2))
    assert len(epoch) == len(windows) == (10_000 - 1) // (16 * 4)
    for x, y in epoch[:3]:
        assert x.dtype == torch.long and x.shape == (4, 16)
        assert torch.equal(y, x + 1)  # the target is the next token (ids here count up)
    resumed = list(windows.epoch(2, start_batch=5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, epoch[5:]))
    other_epoch, other_seed = next(windows.epoch(3)), next(RandomWindows(ids, 16, 4, seed=8).epoch(2))
    assert not torch.equal(other_epoch[0], epoch[0][0]) and not torch.equal(other_seed[0], epoch[0][0])


def test_ranks_take_disjoint_slices_of_the_same_global_batch():
    ids = torch.arange(5_000, dtype=torch.int32)
    whole = next(RandomWindows(ids, 8, 6, seed=1).epoch(1))[0]
    parts = [next(RandomWindows(ids, 8, 6, seed=1, rank=r, world_size=2).epoch(1))[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_validation_covers_the_whole_split_in_non_overlapping_windows():
    ids = torch.arange(1_000, dtype=torch.int32)
    inputs, targets = window_pairs(ids, 64)
    assert inputs.shape == (15, 64) and torch.equal(inputs.flatten(), torch.arange(960))
    assert torch.equal(targets, inputs + 1)
    batches = list(validation_batches(ids, 64, batch_size=4).epoch(0))
    assert sum(len(x) for x, _ in batches) == 15


# ---------------------------------------------------------------------- models
def transformer(**options) -> Transformer:
    torch.manual_seed(0)
    return Transformer(50, 16, layers=2, heads=2, width=32, **options).eval()


@pytest.mark.parametrize("model", [
    lambda: transformer(), lambda: transformer(norm_position="post", norm="rms"),
    lambda: LSTMLanguageModel(50, layers=2, width=32).eval(),
])  # fmt: skip
def test_no_position_sees_the_future(model):
    model = model()
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 50  # perturb every token from position 9 on
    before, after = model(ids), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])  # positions 0..8 are untouched, bit for bit
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_gpt_init_draws_0_02_and_scales_the_residual_projections():
    model = init_weights(Transformer(1000, 64, layers=12, heads=4, width=256), "gpt")
    projections = {id(p) for p in model.residual_projections()}
    assert len(projections) == 24
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and id(module) in projections:
            assert module.weight.std().item() == pytest.approx(GPT_STD / math.sqrt(24), rel=0.05), name
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            assert weight.std().item() == pytest.approx(GPT_STD, rel=0.05), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(weight, torch.ones_like(weight)), name
    unscaled = init_weights(Transformer(1000, 64, layers=12, heads=4, width=256), "gpt_unscaled")
    assert unscaled.residual_projections()[0].weight.std().item() == pytest.approx(GPT_STD, rel=0.05)


def test_pre_norm_keeps_the_residual_stream_and_post_norm_normalises_it():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32) * 5 + 3
    for position, normalised in (("pre", False), ("post", True)):
        block = Transformer(10, 8, layers=1, heads=2, width=32, norm_position=position).blocks[0].eval()
        out = block(x)
        std = out.std(dim=-1, unbiased=False)
        assert torch.allclose(std, torch.ones_like(std), atol=1e-3) == normalised, position
    assert isinstance(Transformer(10, 8, layers=1, heads=2, width=32, norm_position="post").final_norm, torch.nn.Identity)


def test_pre_norm_block_is_x_plus_each_branch_of_its_norm():
    block = Transformer(10, 8, layers=1, heads=2, width=32).blocks[0].eval()
    x = torch.randn(2, 8, 32)
    mid = x + block.attention(block.norm1(x))
    assert torch.allclose(block(x), mid + block.feed_forward(block.norm2(mid)), atol=1e-6)


def test_tied_weights_are_one_tensor_counted_once_and_survive_export(tmp_path):
    tied, untied = transformer(), transformer(tie_weights=False)
    assert tied.head.weight is tied.token_embedding.weight
    assert parameter_count(untied) - parameter_count(tied) == 50 * 32
    tied(torch.randint(0, 50, (2, 16))).sum().backward()
    assert tied.token_embedding.weight.grad is not None
    export_safetensors(tied.state_dict(), tmp_path / "m.safetensors")
    state = load_safetensors(tmp_path / "m.safetensors")
    assert set(state) == set(tied.state_dict()) and torch.equal(state["head.weight"], tied.head.weight)


def test_sequence_longer_than_the_block_is_one_line():
    with pytest.raises(ConfigError, match="longer than the model's --block-size 16"):
        transformer()(torch.zeros(1, 17, dtype=torch.long))


# -------------------------------------------------------------------- generation
def test_generation_is_reproducible_by_seed_and_respects_top_k():
    model = init_weights(transformer(), "gpt")  # near-uniform predictions: every seed samples differently
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGHIJKLMNOP")
    one = generate(model, tokenizer, "abc", tokens=40, seed=5)
    assert one.startswith("abc") and len(one) == 43
    assert generate(model, tokenizer, "abc", tokens=40, seed=5) == one
    assert generate(model, tokenizer, "abc", tokens=40, seed=6) != one
    greedy_like = {generate(model, tokenizer, "abc", tokens=10, seed=s, top_k=1) for s in range(4)}
    assert len(greedy_like) == 1  # top-1 leaves nothing to chance


def test_undecodable_prompt_bytes_are_unknown_characters():
    """`--prompt $'\\xff\\xfe'` reaches Python as surrogates, which no codec encodes."""
    char = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGHIJKLMNOP")
    for tokenizer in (char, ByteTokenizer()):
        torch.manual_seed(0)
        model = Transformer(tokenizer.vocab_size, 16, layers=1, heads=2, width=32).eval()
        text = generate(model, tokenizer, "ab\udcff\udcfe", tokens=5, seed=1)
        assert text.startswith(f"ab{UNKNOWN_CHAR}{UNKNOWN_CHAR}") and len(text.encode("utf-8")) >= 10
        assert generate(model, tokenizer, "\udcff", tokens=0) == UNKNOWN_CHAR
    ids = char.encode(text_tokenizers.replace_surrogates("a\udcff"))
    assert ids.tolist() == [char.chars.index("a"), char.unknown_id]


# --------------------------------------------------------------- runs, end to end
def text_config(text_file: Path, out: Path, **settings) -> object:
    base = dict(dataset="text", data_file=str(text_file), layers=2, heads=2, width=32, block_size=32, batch_size=8,
                max_steps=40, device="cpu", out=str(out))  # fmt: skip
    return recipe_config({**base, **settings})


def test_val_loss_is_the_mean_over_the_whole_validation_split(text_file, tmp_path):
    summary = train_run(text_config(text_file, tmp_path / "run", eval_batch_size=7, precision="fp32"))
    data = load_text(text_file, block_size=32)
    model = Transformer(data.vocab_size, 32, layers=2, heads=2, width=32)
    model.load_state_dict(load_safetensors(tmp_path / "run" / "model.safetensors"))
    inputs, targets = window_pairs(data.val, 32)
    with torch.no_grad():
        by_hand = F.cross_entropy(model.eval()(inputs).flatten(0, 1), targets.flatten()).item()
    assert summary["val_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert summary["val_bits_per_token"] == pytest.approx(by_hand / math.log(2), rel=1e-5)
    assert summary["val_perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-4)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 2, "a 40-step budget validates once, at its end"


def test_a_short_run_learns_more_than_character_frequencies(text_file, tmp_path):
    summary = train_run(text_config(text_file, tmp_path / "run", max_steps=150, lr=3e-3))
    text = text_file.read_text(encoding="utf-8")
    counts = torch.tensor([text.count(c) for c in set(text)], dtype=torch.float64)
    unigram = -(counts / counts.sum() * (counts / counts.sum()).log()).sum().item()
    assert summary["val_loss"] < unigram - 0.2, (summary["val_loss"], unigram)


def test_lstm_trains_and_generates_from_its_run_folder(text_file, tmp_path, capsys):
    summary = train_run(text_config(text_file, tmp_path / "run", model="lstm", norm="layer", max_steps=30))
    assert math.isfinite(summary["val_loss"])
    argv = ["generate", str(tmp_path / "run"), "--prompt", "In the", "--tokens", "30", "--seed", "1"]
    code, first = run_main(argv, capsys)
    assert code == 0 and first.startswith("In the") and len(first.rstrip("\n")) >= 36
    assert run_main(argv, capsys) == (0, first)
    code, output = run_main([*argv[:2], "--prompt", "\udcff\udcfe", "--tokens", "5"], capsys)  # $'\xff\xfe'
    assert code == 0 and output.startswith(UNKNOWN_CHAR * 2) and len(output.rstrip("\n")) >= 7


def trainkit(cwd: Path, *args: str, kill_at: str | None = None, processes: int = 1) -> subprocess.CompletedProcess:
    """`trainkit train ARGS` in a fresh process (under torchrun with gloo when ``processes`` > 1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_KILL") and k not in ("RANK", "WORLD_SIZE")}
    env.update(TRAINKIT_OFFLINE="1", OMP_NUM_THREADS="1")
    if kill_at:
        env["TRAINKIT_KILL_AT"] = kill_at
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master-port", str(free_port())]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "trainkit", "train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_a_text_run_resumes_bit_exactly_after_sigkill(text_file, tmp_path):
    args = ["--dataset", "text", "--data-file", str(text_file), *TINY, "--max-steps", "24", "--dropout", "0.1",
            "--checkpoint-every-steps", "5", "--val-every-steps", "10"]  # fmt: skip
    whole = trainkit(tmp_path, *args, "--out", "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = trainkit(tmp_path, *args, "--out", "killed", kill_at="step:17")
    assert killed.returncode != 0 and not (tmp_path / "killed" / "summary.json").exists()
    resumed = trainkit(tmp_path, *args, "--out", "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summaries = [json.loads((tmp_path / out / "summary.json").read_text()) for out in ("whole", "killed")]
    assert summaries[0]["model_sha256"] == summaries[1]["model_sha256"]
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]


# ------------------------------------------------------------------- bad input
def bad_cases(tmp_path: Path, text_file: Path) -> list[tuple[list[str], str]]:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf")
    zeros = tmp_path / "zeros.txt"
    zeros.touch()
    os.truncate(zeros, 2**20)  # truncate -s 1M: a sparse file of NULs
    text = ["train", "--dataset", "text", "--data-file", str(text_file), "--out", str(tmp_path / "run")]
    return [
        (["train", "--dataset", "text", "--out", str(tmp_path / "run")], "needs --data-file"),
        ([*text[:4], str(tmp_path / "missing.txt"), *text[5:]], "does not exist"),
        ([*text[:4], str(tmp_path), *text[5:]], "it is a folder"),
        ([*text[:4], str(latin1), *text[5:]], "is not UTF-8 text (byte 3 is 0xe9)"),
        ([*text[:4], str(empty), *text[5:]], "holds no text"),
        ([*text[:4], str(bom), *text[5:]], f"--data-file {bom} holds no text"),
        ([*text[:4], str(zeros), *text[5:]], f"--data-file {zeros} is not text: 1,048,576 of its 1,048,576 "
         "characters are control characters (1,048,576 NUL); is it binary or a sparse/zeroed file?"),
        ([*text, "--tokenizer", "words"], "--tokenizer: invalid choice"),
        ([*text, "--vocab-size", "500"], "--vocab-size sets the bpe vocabulary"),
        ([*text, "--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size must be in 257.."),
        ([*text, "--val-fraction", "1.0"], "--val-fraction must be in [0, 1)"),
        ([*text, "--val-fraction", "0.00001"], "the validation split has"),
        ([*text, "--block-size", "0"], "--block-size must be an integer >= 1"),
        ([*text, "--block-size", "70000"], "the training split has"),
        ([*text, "--layers", "0"], "--layers must be an integer >= 1"),
        ([*text, "--heads", "3"], "--width 128 must be divisible by --heads 3"),
        ([*text, "--norm-position", "middle"], "--norm-position: invalid choice"),
        ([*text, "--norm", "group"], "--norm must be one of layer, rms, batch, none"),
        ([*text, "--attention-dropout", "1.5"], "--attention-dropout must be in [0, 1)"),
        ([*text, "--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0"),
        ([*text, "--warmup-steps", "10", "--warmup", "1"], "give the warmup once"),
        ([*text, "--warmup-steps", "2000"], "--warmup-steps 2000 is not shorter than the run"),
        ([*text, "--model", "mlp"], "--model mlp is an image model"),
        ([*text, "--task", "classification"], "trains the next_token task"),
        ([*text, "--width", "100000000"], "use a smaller --width, --layers or --block-size"),
        (["train", "--dataset", "synthetic", "--model", "transformer", "--out", str(tmp_path / "run")],
         "--model transformer is a language model"),
        (["generate", str(tmp_path / "nothing.pt")], "does not exist"),
        (["generate", str(text_file), "--tokens", "-1"], "--tokens must be an integer >= 0"),
        (["generate", str(text_file), "--temperature", "0"], "--temperature must be a positive finite number"),
        (["generate", str(text_file), "--top-k", "0"], "--top-k must be a positive integer"),
        (["generate", str(text_file)], "not written by trainkit"),
    ]  # fmt: skip


def test_every_new_flag_with_a_bad_value_is_one_line_and_writes_no_run(text_file, tmp_path, capsys):
    failures = []
    for argv, expected in bad_cases(tmp_path, text_file):
        code, output = run_main(argv, capsys)
        if code != EXIT_USAGE or len(output.strip().splitlines()) != 1 or expected not in output:
            failures.append(f"{' '.join(argv[-4:])}: exit {code}: {output.strip()[-300:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "run" / "config.json").exists()


def test_generate_refuses_a_checkpoint_of_an_image_run(synthetic_config, capsys):
    config = synthetic_config(epochs=1)
    train_run(config)
    code, output = run_main(["generate", str(Path(config.out) / "checkpoints" / "best.pt")], capsys)
    assert code == EXIT_USAGE and "is not a --dataset text run's checkpoint" in output


def test_two_processes_on_gloo_train_the_same_model_as_one(text_file, tmp_path):
    """DDP, and FSDP (each Transformer block a unit; the tied embedding and head with the root)."""
    args = ["--dataset", "text", "--data-file", str(text_file), *TINY, "--max-steps", "12", "--precision", "fp32"]
    for strategy in ("ddp", "fsdp"):
        done = trainkit(tmp_path, *args, "--strategy", strategy, "--out", strategy, processes=2)
        assert done.returncode == 0, done.stderr[-2000:]
    single = trainkit(tmp_path, *args, "--out", "single")
    assert single.returncode == 0, single.stderr[-2000:]
    losses = {out: json.loads((tmp_path / out / "summary.json").read_text())["val_loss"] for out in ("ddp", "fsdp", "single")}
    for strategy in ("ddp", "fsdp"):  # the same windows, split over ranks; sums in another order
        assert losses[strategy] == pytest.approx(losses["single"], rel=1e-5), strategy
