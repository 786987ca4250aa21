"""Peak memory of `linglab train --data.path=FILE`'s data path on one 8 MB single-line text, chunked vs unchunked.

The data path is `build_data` as `linglab train` calls it: read the file, train the BPE tokenizer on it, encode it
and pack it into rows (`text_token_stream`, `PackedDataset.from_stream`). linglab hands the tokenizer library a
long text in pieces (`text_chunks`), because the library holds a text's whole encoding and its pre-tokens at once.
The baseline is the same `build_data` with `text_chunks` replaced by the identity, so the tokenizer's train and
encode each get the whole document at once; both must give the same packed tokens, which this script checks.

Each case runs in a fresh Python process and reports its own peak RSS (`ru_maxrss`), so one case's freed memory
cannot hide the next one's peak. A 200 KB file through linglab's path is the floor: the interpreter, torch and
the other imports. The text is random words from a fixed seed (no download), one line, no blank line.

    .venv/bin/python benchmarks/text_memory.py [--mbytes 8] [--floor-kbytes 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

GIB = 1 << 30


def write_text(path: Path, num_bytes: int, seed: int = 0) -> None:
    """One line of `num_bytes` ASCII characters: words from a fixed 5000-word vocabulary, some numbers among them."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(5000)]
    vocab += [str(rng.randint(0, 99999)) for _ in range(500)]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]  # Zipf-like, so BPE finds frequent pairs to merge
    words, size = [], 0
    while size < num_bytes:
        batch = rng.choices(vocab, weights=weights, k=10000)
        words.extend(batch)
        size += sum(len(w) + 1 for w in batch)
    path.write_text(" ".join(words)[:num_bytes].rstrip(), encoding="ascii")


def measure(path: str, chunked: bool) -> dict:
    """Run `build_data` on `path` in this process; its peak RSS, wall time and a digest of the packed rows."""
    from unittest import mock

    from linglab import data, tokenizer
    from linglab.config import load_config

    cfg = load_config("tiny", overrides=[f"--data.path={path}"]).data
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        if chunked:
            run = data.build_data(cfg, Path(run_dir), eval_problems=0, save_tokenizer=False, reuse_saved=False)
        else:
            def whole(text, max_chars=None):
                return iter((text,))

            # Both modules bind the name, so both call sites (tokenizer training, encoding) see the identity.
            with mock.patch.object(tokenizer, "text_chunks", whole), mock.patch.object(data, "text_chunks", whole):
                run = data.build_data(cfg, Path(run_dir), eval_problems=0, save_tokenizer=False, reuse_saved=False)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rows = run.train.tokens.numpy()
    return {"peak_gib": peak_kib * 1024 / GIB, "seconds": seconds, "rows": int(rows.shape[0]),
            "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}


def run_child(path: Path, chunked: bool) -> dict:
    """`measure` in a fresh interpreter, so each peak is that case's alone."""
    mode = "chunked" if chunked else "unchunked"
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)],
                         check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mbytes", type=float, default=8, help="size of the long single-line file (MB)")
    parser.add_argument("--floor-kbytes", type=float, default=200, help="size of the floor file (KB)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path = args.child
        print(json.dumps(measure(path, chunked=mode == "chunked")))
        return

    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "long_line.txt", Path(tmp) / "floor.txt"
        write_text(big, int(args.mbytes * 1e6))
        write_text(small, int(args.floor_kbytes * 1e3))
        results = {"chunked": run_child(big, True), "unchunked": run_child(big, False),
                   "floor": run_child(small, True)}
    if results["chunked"]["rows_sha256"] != results["unchunked"]["rows_sha256"]:
        raise SystemExit("chunked and unchunked packed rows differ: the comparison is not of the same work")
    labels = {"chunked": f"linglab path, {args.mbytes:g} MB", "unchunked": f"no chunking, {args.mbytes:g} MB",
              "floor": f"linglab path, {args.floor_kbytes:g} KB"}
    for name, r in results.items():
        print(f"{labels[name]:22s} peak RSS {r['peak_gib']:.3f} GiB  {r['seconds']:6.1f} s  {r['rows']} rows")
    peaks = {name: r["peak_gib"] for name, r in results.items()}
    ratio = peaks["unchunked"] / peaks["chunked"]
    above_floor = (peaks["unchunked"] - peaks["floor"]) / (peaks["chunked"] - peaks["floor"])
    print(f"unchunked / chunked {ratio:.2f}x; above the floor {above_floor:.1f}x; packed rows identical")
    report("text_memory", {"text_memory_ratio": (ratio, 2), "text_memory_chunked_gib": (peaks["chunked"], 1)},
           {"peak_gib": peaks, "above_floor_ratio": above_floor, "cases": results, "text_mbytes": args.mbytes,
            "floor_kbytes": args.floor_kbytes, "preset": "tiny"})


if __name__ == "__main__":
    main()
