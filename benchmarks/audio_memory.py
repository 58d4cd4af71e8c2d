"""Peak memory and time of reading one long many-channel file, against decoding it whole.

    python benchmarks/audio_memory.py                  # 5 min, 192 kHz, 8 channels (FLAC)
    python benchmarks/audio_memory.py --seconds 60 --rate 96000 --channels 2

The file is made by sox (a different tone per channel). ``whole`` is the way files were
read before (decode the whole file to float32, average the channels, resample once);
``blocks`` is `beats.audio.load_audio` (decode, downmix and resample block by block).
Each runs in a fresh process; the columns are the growth of the process's peak resident
memory over what it held before the read, the wall time, and the ratios to ``whole``.
The last line gives the largest difference between the two results (they should be equal).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, resource, sys, time
import numpy as np, soundfile as sf, soxr
from beats.audio import load_audio

def whole(path):
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return soxr.resample(data.mean(axis=1, dtype=np.float32), rate, 16000, quality="HQ")

def blocks(path):
    return load_audio(path)[0]

path, how, save = sys.argv[1], sys.argv[2], sys.argv[3]
load_audio(path, duration=0.05)  # libraries warm
page = resource.getpagesize()
before = int(open("/proc/self/statm").read().split()[1]) * page
start = time.perf_counter()
wav = {"whole": whole, "blocks": blocks}[how](path)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
np.save(save, wav)
print(json.dumps({"grown": max(peak - before, 0), "seconds": seconds, "samples": len(wav)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=int, default=192000)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="beats-audio-memory-") as tmp:
        path = Path(tmp) / "long.flac"
        tones = [arg for c in range(args.channels) for arg in ("sine", str(220 * (c + 1)))]
        subprocess.run(["sox", "-n", "-r", str(args.rate), "-c", str(args.channels), "-b", "16",
                        str(path), "synth", str(args.seconds), *tones, "vol", "0.5"],
                       check=True)
        decoded = args.seconds * args.rate * args.channels * 4
        print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
        print(f"file: {args.seconds:g} s, {args.rate} Hz, {args.channels} channels, FLAC "
              f"{path.stat().st_size / 1e6:.0f} MB; decoded whole as float32: "
              f"{decoded / 1e6:.0f} MB")
        results = {}
        for how in ("whole", "blocks"):
            proc = subprocess.run(
                [sys.executable, "-c", MEASURE, str(path), how, str(Path(tmp) / f"{how}.npy")],
                capture_output=True, text=True, check=True,
                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            )
            results[how] = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results["whole"]
        print(f"{'read':8s} {'peak RSS growth':>16s} {'seconds':>8s} {'memory':>8s} {'time':>6s}")
        for how, r in results.items():
            memory = r["grown"] / max(base["grown"], 1)
            print(f"{how:8s} {r['grown'] / 2**20:13.1f} MiB {r['seconds']:8.2f} "
                  f"{memory:7.3f}x {r['seconds'] / base['seconds']:5.2f}x")

        a, b = (np.load(Path(tmp) / f"{how}.npy") for how in ("whole", "blocks"))
        print(f"samples {len(a)} and {len(b)}; max |whole - blocks| = "
              f"{float(np.abs(a - b).max()) if len(a) == len(b) else float('nan'):.3g}")


if __name__ == "__main__":
    main()
