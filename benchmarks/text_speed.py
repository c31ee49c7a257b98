"""Text: trainkit's Transformer against nanoGPT's CPU command on kjv.txt, as whole processes.

    python benchmarks/text_speed.py --nanogpt PATH/TO/nanoGPT [--rounds 2] [--only same-fp32,default]

Each entry is a fresh process (Python start, imports, reading and encoding the text, 2,000
steps, the final whole-split validation, writing outputs), timed from outside; entries run in
interleaved rounds so that a noisy neighbour hits all of them alike, and each is reported as
a ratio to nanoGPT's time in the same round. Every loss is the mean over the WHOLE validation
split (the last 10% of the characters) cut into non-overlapping 64-character windows; for
nanoGPT it is computed here from its saved ckpt.pt with its own model.py.

nanoGPT is not part of trainkit: pass a checkout of karpathy/nanoGPT (commit 3adf61e). Its
data folder gets ``data/kjv_char`` (train.bin, val.bin, meta.pkl: the character vocabulary of
the whole file, first 90% train) the first time. Without ``--nanogpt`` only trainkit runs.

Also measured, once per invocation: this CPU's matmul peak (GFLOP/s of a large fp32 and bf16
GEMM on all threads), against which each entry's training FLOP rate is given as a fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT.parent / "shared" / "datasets" / "text" / "kjv.txt"
SAME_SIZE = ["--layers", "4", "--heads", "4", "--width", "128", "--block-size", "64", "--batch-size", "12",
             "--max-steps", "2000"]  # fmt: skip
NANOGPT_ARGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=100", "--block_size=64",
                "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                "--lr_decay_iters=2000", "--dropout=0.0", "--dataset=kjv_char"]  # fmt: skip


@dataclass
class Entry:
    name: str
    args: list[str]  # trainkit train flags; empty for nanoGPT


ENTRIES = {
    "nanogpt": Entry("nanoGPT (its README's CPU command)", []),
    "same-fp32": Entry("trainkit, nanoGPT's size and budget, fp32, foreach AdamW",
                       [*SAME_SIZE, "--precision", "fp32", "--no-fused-optimizer"]),
    "same": Entry("trainkit, nanoGPT's size and budget (recipe: bf16 where it measures faster, fused AdamW)", SAME_SIZE),
    # what the recipe chose before bf16 was decided by measurement, on a CPU with AVX-512 BF16 but no AMX
    "same-recipe-fp32": Entry("trainkit, nanoGPT's size and budget, fp32, fused AdamW", [*SAME_SIZE, "--precision", "fp32"]),
    "default": Entry("trainkit, the default text recipe", []),
}  # fmt: skip


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a size x size x size GEMM, best of ``repeats``."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm up (AMX tile configuration, allocator)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def prepare_nanogpt_data(nanogpt: Path) -> None:
    """nanoGPT's shakespeare_char layout for kjv.txt (vocabulary of the whole file, as its prepare.py)."""
    folder = nanogpt / "data" / "kjv_char"
    if (folder / "meta.pkl").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    text = KJV.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(text) * 0.9)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as file:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, file)


def nanogpt_whole_split_loss(nanogpt: Path, checkpoint: Path, block: int = 64, batch: int = 256) -> float:
    """Mean cross-entropy over every non-overlapping window of the validation split, nanoGPT's own model."""
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    saved = torch.load(checkpoint, map_location="cpu")
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    val = torch.from_numpy(np.fromfile(nanogpt / "data" / "kjv_char" / "val.bin", dtype=np.uint16).astype(np.int64))
    count = (len(val) - 1) // block
    inputs, targets = val[: count * block].view(count, block), val[1 : count * block + 1].view(count, block)
    total = 0.0
    with torch.no_grad():
        for start in range(0, count, batch):
            logits, _ = model(inputs[start : start + batch], targets[start : start + batch])  # full logits with targets
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[start : start + batch].flatten(),
                                                       reduction="sum").item()  # fmt: skip
    return total / (count * block)


def run_once(key: str, nanogpt: Path | None) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if key == "nanogpt":
            command = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_ARGS, f"--out_dir={out}"]
            cwd = nanogpt
        else:
            command = [sys.executable, "-m", "trainkit", "train", "--dataset", "text", "--data-file", str(KJV),
                       "--out", str(out), *ENTRIES[key].args]  # fmt: skip
            cwd = ROOT
        started = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{key} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        if key == "nanogpt":
            return {"wall": wall, "val_loss": nanogpt_whole_split_loss(nanogpt, out / "ckpt.pt"), "steps": 2000,
                    "tokens_per_step": 12 * 64}  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
        history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()]
        seconds = sum(float(row[history[0].index("epoch_seconds")]) for row in history[1:])
        return {"wall": wall, "val_loss": summary["val_loss"], "steps": summary["optimizer_steps"],
                "tokens_per_step": config["batch_size"] * config["block_size"], "loop_seconds": seconds,
                "flops_per_token": flops_per_token(config)}  # fmt: skip


def flops_per_token(config: dict) -> float:
    """Training FLOPs per token of the run's Transformer (trainkit.recipes.text.models.training_flops_per_token)."""
    from trainkit.config.files import config_from_dict
    from trainkit.recipes.text.models import build_sequence_model, training_flops_per_token

    model = build_sequence_model(config_from_dict(config).resolved(), vocab_size=74)
    return training_flops_per_token(model, config["block_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout (commit 3adf61e)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="nanogpt,same-fp32,same,default", help="entries, comma separated")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "text_speed.json")
    args = parser.parse_args()
    keys = [key for key in args.only.split(",") if key != "nanogpt" or args.nanogpt]
    if args.nanogpt:
        prepare_nanogpt_data(args.nanogpt.resolve())
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak on {torch.get_num_threads()} threads: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s")
    runs: dict[str, list[dict]] = {key: [] for key in keys}
    for round_ in range(args.rounds):
        for key in keys:
            result = run_once(key, args.nanogpt.resolve() if args.nanogpt else None)
            runs[key].append(result)
            print(f"round {round_ + 1} {key}: {result['wall']:.1f} s, val_loss {result['val_loss']:.4f}", flush=True)
    report(runs, peaks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "peaks_gflops": peaks, "runs": runs}, indent=2))


def report(runs: dict[str, list[dict]], peaks: dict[str, float]) -> None:
    """A Markdown table: median wall, ratio to nanoGPT's time in the same round, loss, tokens/s, peak fraction."""
    print("| entry | wall s (median) | vs nanoGPT, same round | val_loss | train tokens/s | of matmul peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    reference = runs.get("nanogpt")
    for key, results in runs.items():
        wall = statistics.median(r["wall"] for r in results)
        ratio = "" if not reference else "/".join(f"{r['wall'] / n['wall']:.2f}x" for r, n in zip(results, reference))
        tokens = results[0]["steps"] * results[0]["tokens_per_step"]
        rate = statistics.median(tokens / r.get("loop_seconds", r["wall"]) for r in results)
        flops = results[0].get("flops_per_token")
        precision = "bf16" if "--precision" not in ENTRIES[key].args else "fp32"
        peak = f"{rate * flops / 1e9 / peaks[precision]:.1%} of {precision}" if flops else ""
        losses = "/".join(f"{r['val_loss']:.4f}" for r in results)
        print(f"| {ENTRIES[key].name} | {wall:.1f} | {ratio} | {losses} | {rate:,.0f} | {peak} |")


if __name__ == "__main__":
    main()
