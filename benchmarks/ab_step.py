"""An A/B of the training step between copies of the library's source, alternated in one session on one GPU.

Each `--code NAME=SRC` names a `src` directory: the working tree's, or another revision's (`git archive REV src | tar
-x -C DIR` gives DIR/src). Each run is `benchmarks/train_step.py` in its own process with PYTHONPATH=SRC, and the
codes run in the order given, --alternations times over: `--code new=src --code old=/tmp/old/src --alternations 2`
runs new, old, new, old. The arguments after `--` go to every train_step.py run. Writes {code, command, order, runs,
device} to --json and prints, per config and row, each code's img/s and GPU ms run by run, and the ratio of each
code's median img/s to the first code's.

    git archive 05319e1 src | tar -x -C /tmp/old
    python benchmarks/ab_step.py --code new=src --code old=/tmp/old/src --alternations 2 --json ab.json -- \
        --rows step_graph,step_loop --iters 10 --configs imagenette_supervised,imagenette_pretrain
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def schedule(names: list[str], alternations: int) -> list[str]:
    """The runs in order, each named code_round: the codes in the given order, `alternations` times over."""
    return [f"{name}_{r}" for r in range(1, alternations + 1) for name in names]


def code_of(run: str) -> str:
    """The code's name of a run named by `schedule`."""
    return run.rsplit("_", 1)[0]


def run_code(src: str, passthrough: list[str], out: Path) -> dict:
    """One train_step.py process on the source directory `src`; its JSON ({device, results})."""
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    cmd = [sys.executable, str(HERE / "train_step.py"), *passthrough, "--json", str(out)]
    print("$ PYTHONPATH=" + env["PYTHONPATH"], " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def compare(runs: dict[str, list[dict]], names: list[str]) -> list[dict]:
    """Per (config, row): each code's img/s and GPU ms in run order, its median img/s, and that median over the
    first code's. Rows that failed in a run (an "error" instead of img/s) are left out of that run."""
    keys = list(dict.fromkeys((r["config"], r["row"]) for results in runs.values() for r in results))
    out = []
    for config, row in keys:
        entry: dict = {"config": config, "row": row}
        for name in names:
            hits = [r for run, results in runs.items() if code_of(run) == name for r in results
                    if (r["config"], r["row"]) == (config, row) and "img_s" in r]
            entry[name] = {"img_s": [r["img_s"] for r in hits], "gpu_ms": [r["gpu_ms"] for r in hits if "gpu_ms" in r],
                           "median_img_s": statistics.median(r["img_s"] for r in hits) if hits else None}
        first = entry[names[0]]["median_img_s"]
        for name in names:
            median = entry[name]["median_img_s"]
            entry[name]["ratio"] = round(median / first, 3) if median and first else None
        out.append(entry)
    return out


def table(rows: list[dict], names: list[str]) -> str:
    head = "| config | row | " + " | ".join(f"{n}: img/s (GPU ms) | {n} / {names[0]}" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    for e in rows:
        cells = []
        for n in names:
            runs = ", ".join(f"{i:,.0f}" for i in e[n]["img_s"])
            cells += [f"{runs} ({', '.join(map(str, e[n]['gpu_ms'])) or '-'})", str(e[n]["ratio"])]
        lines.append(f"| {e['config']} | {e['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", action="append", required=True, metavar="NAME=SRC", help="a name and a src directory")
    p.add_argument("--alternations", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args(argv[:split])
    passthrough = argv[split + 1:]
    codes = dict(c.split("=", 1) for c in args.code)
    if len(codes) < 2 or any(not (Path(s) / "mal").is_dir() for s in codes.values()):
        p.error(f"--code: give two or more NAME=SRC, each SRC a directory holding the package mal; got {args.code}")
    order, runs, device = schedule(list(codes), args.alternations), {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for run in order:
            res = run_code(codes[code_of(run)], passthrough, Path(tmp) / f"{run}.json")
            runs[run], device = res["results"], device or res["device"]
    rows = compare(runs, list(codes))
    print(table(rows, list(codes)))
    out = {"code": codes, "command": " ".join([Path(sys.argv[0]).name, *argv]), "order": order, "runs": runs,
           "device": device, "comparison": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
