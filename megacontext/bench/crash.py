"""Kill campaign: SIGKILL ``megacontext ingest``, the distributed merge and training, and check
that nothing committed is ever lost, torn or duplicated.

    python -m megacontext.bench.crash                  # 50 ingest, 10 merge, 5 training kills
    python -m megacontext.bench.crash --ingest-kills 3 --merge-kills 1 --train-kills 1
    python -m megacontext.bench.crash --json docs/crash-campaign.json --seed 0

Everything runs on the CPU with a small random base model whose tokenizer is a byte-level BPE
trained on the campaign's text, and a small GistNet export (``crash_setup``), so the work is
real — exact tokenization across read boundaries, GistNet level by level, commits — and fast.

1. **Ingest.** ``megacontext ingest`` (a subprocess, as a user runs it) over text files is
   SIGKILLed after a random (seeded) delay; each kill is classed by what it hit: *mid-work*
   (the process was still running and the tree's committed tokens were below the stream's
   total; of these, how many after that run had committed), *before the tree existed*, or
   *after completion*. After each kill the tree must verify (``megacontext.tree.verify``), its
   committed ids must be a prefix of the one-shot tokenization of the whole input and its
   levels complete; the same command is then run again — it resumes, and is killed again or
   finishes. A finished tree must equal an uninterrupted ingest byte for byte (and its input
   records the uninterrupted ones), hold exactly the one-shot ids (tokens lost and duplicated
   are counted), pass ``megacontext verify``, and the same command once more must append
   nothing.
2. **Merge.** ``torchrun --nproc_per_node=2 -m megacontext.cli ingest ... --shard-level 1``:
   the whole process tree (launcher and ranks) is killed once the merge has started (the
   tree's committed count moved), after a random part of what is left of the merge's measured
   length (first merge commit to final commit, uninterrupted). A kill
   counts as mid-merge when every shard was complete, the work folder was still there and the
   tree held less than the stream. The same command then resumes; a finished tree must equal
   a serial ingest of the same inputs byte for byte, and its work folder must be gone.
3. **Training.** ``train/train.py experiment=smoke`` with a checkpoint every few steps is
   killed at a random moment and resumed from ``last.ckpt`` (``ckpt_path=``) until it
   finishes; then every tensor of the model's state (GistNet's parameters and buffers) must
   equal, bit for bit (``torch.equal``), an uninterrupted run's at the same step.
4. **Hazards** (``crash_hazards``): the disk filling up mid-ingest, a read-only tree
   directory, a second writer while one is mid-work, and two ingests started at once.

The summary gives, per part, kills landed (and where), trees that survived every check, and
tokens lost and duplicated; ``--json`` writes it all. The exit status is 0 when every check held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megacontext.bench.crash_hazards import hazards
from megacontext.bench.crash_setup import (
    REPO,
    Setup,
    committed_tokens,
    env,
    ingest_cmd,
    kill_tree,
    lost_and_duplicated,
    make_setup,
    records_of,
    run,
    same_bytes,
    tree_state,
    verify_ok,
)


def _kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """Wait up to ``delay`` seconds, then SIGKILL ``proc`` and its descendants if it still
    runs. Returns whether it was running (the kill landed)."""
    try:
        proc.wait(timeout=max(0.0, delay))
    except subprocess.TimeoutExpired:
        pass
    running = proc.poll() is None
    if running:
        kill_tree(proc)
    return running


def _result(tokens: int) -> dict:
    return {"tokens": tokens, "attempts": 0, "rounds": 0, "unsound_after_kill": 0,
            "not_prefix_after_kill": 0, "tokens_lost": 0, "tokens_duplicated": 0,
            "committed_at_kill": []}


# -- 1. ingest -----------------------------------------------------------------------------

def ingest_campaign(s: Setup, kills: int, rng: random.Random, tick=lambda: None) -> dict:
    """``kills`` SIGKILLs landing mid-ingest, each followed by the checks of the module
    docstring (part 1); returns the counts."""
    ref = s.root / "ingest-reference"
    t0 = time.perf_counter()
    out = run(ingest_cmd(s, ref, s.inputs), check=True)
    wall = time.perf_counter() - t0
    work = float(re.search(r" tokens in ([0-9.]+) s ", out.stdout).group(1))  # its own timing
    startup = max(0.2, wall - work)
    rerun = run(ingest_cmd(s, ref, s.inputs), check=True)
    ref_state = tree_state(ref, s.stream)
    assert ref_state.tokens == s.stream.size and ref_state.prefix and not ref_state.problems, \
        f"the uninterrupted reference ingest is wrong: {ref_state}"
    ref_records = records_of(ref)
    r = _result(int(s.stream.size)) | {
        "reference_seconds": round(wall, 2), "reference_work_seconds": work,
        "reference_rerun_appended": committed_tokens(ref) - s.stream.size,
        "reference_rerun_says_nothing_appended": "nothing appended" in rerun.stdout,
        "kills_mid_work": 0, "kills_mid_work_after_a_commit": 0, "kills_before_tree": 0,
        "kills_after_completion": 0, "runs_unkilled": 0, "rounds_equal_to_reference": 0,
        "rerun_appended_tokens": 0, "seconds_at_kill": []}
    tree = None

    def finish_round(path: Path) -> None:
        done = run(ingest_cmd(s, path, s.inputs))  # completes (or is a no-op when complete)
        assert done.returncode == 0, f"resume failed: {done.stderr[-2000:]}"
        lost, dup = lost_and_duplicated(path, s.stream)
        again = run(ingest_cmd(s, path, s.inputs))  # a complete ingest: appends nothing
        appended = committed_tokens(path) - s.stream.size - dup
        r["rerun_appended_tokens"] += appended
        r["tokens_lost"] += lost
        r["tokens_duplicated"] += dup + appended
        r["rounds"] += 1
        r["rounds_equal_to_reference"] += int(
            again.returncode == 0 and "nothing appended" in again.stdout and verify_ok(path)
            and same_bytes(path, ref) and records_of(path) == ref_records)
        shutil.rmtree(path)

    while r["kills_mid_work"] < kills:
        r["attempts"] += 1
        if r["attempts"] > 6 * kills + 10:
            raise RuntimeError(f"only {r['kills_mid_work']} of {r['attempts']} kills landed "
                               f"mid-work: the stream is too short for this machine's speed")
        if tree is None:
            tree = s.root / f"ingest-{r['rounds']}"
        before = committed_tokens(tree)
        remaining = 1 - max(0, before) / s.stream.size
        delay = rng.uniform(0.7 * startup, startup + 1.1 * work * remaining)
        start = time.perf_counter()
        proc = subprocess.Popen(ingest_cmd(s, tree, s.inputs), env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running = _kill_after(proc, delay)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        if not running and proc.returncode != 0:
            raise RuntimeError(f"ingest failed: {err[-2000:]}")
        state = tree_state(tree, s.stream)
        if not state.exists:
            r["kills_before_tree"] += 1
            continue
        r["unsound_after_kill"] += int(bool(state.problems))
        r["not_prefix_after_kill"] += int(not state.prefix)
        if running and state.tokens < s.stream.size and not state.done:
            r["kills_mid_work"] += 1
            r["kills_mid_work_after_a_commit"] += int(state.tokens > max(0, before))
            r["committed_at_kill"].append(state.tokens)
            r["seconds_at_kill"].append(round(time.perf_counter() - start, 2))
            tick()
        elif running:
            r["kills_after_completion"] += 1
        else:
            r["runs_unkilled"] += 1  # it finished before its delay was up
        if state.done or not running:
            finish_round(tree)
            tree = None
    if tree is not None:
        finish_round(tree)
    r["survived"] = r["kills_mid_work"] - r["unsound_after_kill"] - r["not_prefix_after_kill"]
    r["ok"] = (r["unsound_after_kill"] == r["not_prefix_after_kill"] == r["tokens_lost"]
               == r["tokens_duplicated"] == r["rerun_appended_tokens"]
               == r["reference_rerun_appended"] == 0
               and r["reference_rerun_says_nothing_appended"]
               and r["rounds_equal_to_reference"] == r["rounds"])
    return r


# -- 2. distributed merge ------------------------------------------------------------------

def torchrun_cmd(s: Setup, tree: Path) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = ingest_cmd(s, tree, s.merge_inputs, "--shard-level", "1")
    return [torchrun, "--standalone", "--nproc_per_node=2", *cmd[1:]]


def shards_complete(tree: Path) -> bool | None:
    """True when the work folder holds every shard complete; None when it is gone."""
    from megacontext.ingest_dist import PLAN_FILE, ShardPlan, work_dir

    work = work_dir(tree)
    try:
        meta = json.loads((work / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None if not work.exists() else False
    plan = ShardPlan(meta["base"], meta["total"], meta["size"], meta["level"])
    return all(committed_tokens(work / f"shard-{i:08d}") == plan.size for i in plan.shards)


def wait_for_merge(proc: subprocess.Popen, tree: Path, start: int, timeout: float) -> bool:
    """Poll until the merge has committed past ``start`` (True) or the process ended."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if committed_tokens(tree) > start:
            return True
        time.sleep(0.01)
    return False


def merge_campaign(s: Setup, kills: int, rng: random.Random, tick=lambda: None) -> dict:
    """``kills`` SIGKILLs of torchrun and its ranks landing during the merge (part 2)."""
    from megacontext.ingest_dist import work_dir

    serial = s.root / "merge-serial"
    run(ingest_cmd(s, serial, s.merge_inputs), check=True)
    serial_records = records_of(serial)
    ref = s.root / "merge-reference"
    t0 = time.perf_counter()
    proc = subprocess.Popen(torchrun_cmd(s, ref), env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = wait_for_merge(proc, ref, 0, 600)
    t1 = time.perf_counter()
    wait_for_merge(proc, ref, s.merge_stream.size - 1, 600)  # its final commit
    merge_seconds = time.perf_counter() - t1
    assert started and proc.wait() == 0, "the uninterrupted distributed ingest failed"
    assert same_bytes(ref, serial), "distributed ingest differs from the serial one"
    shutil.rmtree(ref)
    r = _result(int(s.merge_stream.size)) | {
        "shards_and_startup_seconds": round(t1 - t0, 2), "merge_seconds": round(merge_seconds, 2),
        "kills_mid_merge": 0, "kills_outside_merge": 0, "rounds_equal_to_serial": 0}
    tree = None

    def finish_round(path: Path) -> None:
        done = run(torchrun_cmd(s, path))
        assert done.returncode == 0, f"resumed merge failed: {done.stderr[-2000:]}"
        lost, dup = lost_and_duplicated(path, s.merge_stream)
        r["tokens_lost"] += lost
        r["tokens_duplicated"] += dup
        r["rounds"] += 1
        r["rounds_equal_to_serial"] += int(verify_ok(path) and same_bytes(path, serial)
                                           and records_of(path) == serial_records
                                           and not work_dir(path).exists())
        shutil.rmtree(path)

    while r["kills_mid_merge"] < kills:
        r["attempts"] += 1
        if r["attempts"] > 4 * kills + 6:
            raise RuntimeError(f"only {r['kills_mid_merge']} of {r['attempts']} kills landed "
                               f"mid-merge")
        if tree is None:
            tree = s.root / f"merge-{r['rounds']}"
        before = max(0, committed_tokens(tree))
        proc = subprocess.Popen(torchrun_cmd(s, tree), env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = 0.0
        if wait_for_merge(proc, tree, before, 600):
            delay = rng.uniform(0, merge_seconds * (1 - before / s.merge_stream.size))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=delay)
        complete = shards_complete(tree)  # just before the kill: the state it lands in
        running = _kill_after(proc, 0)
        if not running and proc.returncode != 0:
            raise RuntimeError(f"distributed ingest failed with {proc.returncode}")
        state = tree_state(tree, s.merge_stream)
        r["unsound_after_kill"] += int(bool(state.problems))
        r["not_prefix_after_kill"] += int(state.exists and not state.prefix)
        if running and complete and state.tokens < s.merge_stream.size:
            r["kills_mid_merge"] += 1
            r["committed_at_kill"].append(state.tokens)
            tick()
        else:
            r["kills_outside_merge"] += 1
        if not running or state.done:
            finish_round(tree)
            tree = None
    if tree is not None:
        finish_round(tree)
    r["survived"] = r["kills_mid_merge"] - r["unsound_after_kill"] - r["not_prefix_after_kill"]
    r["ok"] = (r["unsound_after_kill"] == r["not_prefix_after_kill"] == r["tokens_lost"]
               == r["tokens_duplicated"] == 0 and r["rounds_equal_to_serial"] == r["rounds"])
    return r


# -- 3. training ---------------------------------------------------------------------------

def train_cmd(out: Path, steps: int, every: int, resume: bool) -> list[str]:
    ckpt = out / "checkpoints" / "last.ckpt"
    return [sys.executable, str(REPO / "train" / "train.py"), "experiment=smoke",
            f"output_dir={out}", f"hydra.run.dir={out / 'hydra'}", f"trainer.max_steps={steps}",
            f"module.total_steps={steps}", f"checkpoint_every={every}",
            "trainer.val_check_interval=50", "trainer.limit_val_batches=1",
            *([f"ckpt_path={ckpt}"] if resume else [])]


def _checkpoint(out: Path) -> dict | None:
    import torch

    ckpt = out / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    return torch.load(ckpt, weights_only=True, map_location="cpu")


def train_campaign(s: Setup, kills: int, rng: random.Random, tick=lambda: None,
                   steps: int = 300, every: int = 6) -> dict:
    """``kills`` SIGKILLs of training landing between checkpoints, resumed from
    ``last.ckpt`` (part 3). ``steps`` must be a multiple of ``every`` (the last step is
    checkpointed only then)."""
    import torch

    assert steps % every == 0, f"steps {steps} is not a multiple of checkpoint_every {every}"
    ref = s.root / "train-reference"
    t0 = time.perf_counter()
    done = run(train_cmd(ref, steps, every, False))
    wall = time.perf_counter() - t0
    assert done.returncode == 0, f"the uninterrupted training failed: {done.stderr[-3000:]}"
    want = _checkpoint(ref)
    assert want["global_step"] == steps
    want = want["state_dict"]
    r = {"steps": steps, "checkpoint_every": every, "reference_seconds": round(wall, 2),
         "kills_mid_training": 0, "kills_mid_training_after_a_checkpoint": 0,
         "kills_outside_training": 0, "attempts": 0, "rounds": 0, "unreadable_checkpoints": 0,
         "rounds_bit_identical": 0, "step_at_kill": [], "mismatched_tensors": []}
    out = None

    def step(path: Path) -> int:
        """The last checkpoint's step; -1 when there is none, -2 when it cannot be read."""
        try:
            ckpt = _checkpoint(path)
        except Exception:  # noqa: BLE001 — a torn checkpoint is what this counts
            return -2
        return -1 if ckpt is None else int(ckpt["global_step"])

    def finish_round(path: Path) -> None:
        if step(path) != steps:
            done = run(train_cmd(path, steps, every, step(path) >= 0))
            assert done.returncode == 0, f"resumed training failed: {done.stderr[-3000:]}"
        got = _checkpoint(path)
        bad = [k for k in want if k not in got["state_dict"]
               or not torch.equal(got["state_dict"][k], want[k])]
        r["mismatched_tensors"].extend(bad)
        r["rounds"] += 1
        r["rounds_bit_identical"] += int(not bad and got["state_dict"].keys() == want.keys()
                                         and got["global_step"] == steps)
        shutil.rmtree(path)

    while r["kills_mid_training"] < kills:
        r["attempts"] += 1
        if r["attempts"] > 5 * kills + 5:
            raise RuntimeError(f"only {r['kills_mid_training']} of {r['attempts']} kills "
                               f"landed mid-training")
        if out is None:
            out = s.root / f"train-{r['rounds']}"
        before = step(out)
        proc = subprocess.Popen(train_cmd(out, steps, every, before >= 0), env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running = _kill_after(proc, rng.uniform(0.5 * wall, 1.05 * wall))
        if not running and proc.returncode != 0:
            raise RuntimeError(f"training failed with {proc.returncode}")
        at = step(out)
        if at == -2:  # the kill tore the checkpoint: nothing to resume from, a failure
            r["unreadable_checkpoints"] += 1
            r["kills_mid_training"] += 1
            shutil.rmtree(out)
            out = None
            continue
        if running and 0 <= at < steps:  # mid-training, with a checkpoint to resume from
            r["kills_mid_training"] += 1
            r["kills_mid_training_after_a_checkpoint"] += int(at > before)
            r["step_at_kill"].append(at)
            tick()
        else:  # before the first checkpoint (resumed from scratch), or after the last step
            r["kills_outside_training"] += 1
        if not running or at == steps:
            finish_round(out)
            out = None
    if out is not None:
        finish_round(out)
    r["survived"] = r["kills_mid_training"] - r["unreadable_checkpoints"]
    r["ok"] = (r["unreadable_checkpoints"] == 0 and r["rounds_bit_identical"] == r["rounds"])
    return r


# -- the campaign --------------------------------------------------------------------------

PARTS = (("ingest", "kills_mid_work", "rounds_equal_to_reference"),
         ("merge", "kills_mid_merge", "rounds_equal_to_serial"),
         ("training", "kills_mid_training", "rounds_bit_identical"))


def summary(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kill campaign")
    for column in ("part", "kills landed", "elsewhere", "survived", "rounds ok",
                   "tokens lost", "duplicated", "ok"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for name, landed, rounds in PARTS:
        r = results.get(name)
        if r:
            table.add_row(name, f"{r[landed]}", f"{r['attempts'] - r[landed]}",
                          f"{r['survived']}", f"{r[rounds]}/{r['rounds']}",
                          f"{r.get('tokens_lost', '-')}", f"{r.get('tokens_duplicated', '-')}",
                          "yes" if r["ok"] else "NO")
    for name, r in (results.get("hazards") or {}).items():
        table.add_row(name, "", "", "yes" if r["sound"] else "NO", "", "", "",
                      "yes" if r["ok"] else "NO")
    console = Console()
    console.print(table)
    for name, r in (results.get("hazards") or {}).items():
        console.print(f"{name} ({r['how']}): exit {r['exit']}: {r['error']}")


def all_ok(results: dict) -> bool:
    parts = [results[name] for name, _, _ in PARTS if name in results]
    return all(r["ok"] for r in parts + list((results.get("hazards") or {}).values()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest-kills", type=int, default=50)
    parser.add_argument("--merge-kills", type=int, default=10)
    parser.add_argument("--train-kills", type=int, default=5)
    parser.add_argument("--chars", type=float, default=4e6,
                        help="characters of the ingest's text (documents of ~100k)")
    parser.add_argument("--merge-chars", type=float, default=1e6,
                        help="characters of the distributed ingest's text (shards of 2,048 "
                             "tokens); the hazards use it too")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--no-hazards", action="store_true",
                        help="skip the full disk, read-only tree and two writers")
    parser.add_argument("--seed", type=int, default=0, help="seeds the texts and the delays")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    start = time.perf_counter()
    rng = random.Random(args.seed)
    results: dict = {"seed": args.seed, "date": time.strftime("%Y-%m-%d"),
                     "command": "python -m megacontext.bench.crash "
                                + " ".join(argv if argv is not None else sys.argv[1:])}
    with contextlib.ExitStack() as stack:
        if args.keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="megacontext-crash-")))
        else:
            root = args.keep
            root.mkdir(parents=True, exist_ok=True)
        s = make_setup(root, int(args.chars), int(args.merge_chars), args.seed)
        results |= {"ingest_stream_tokens": int(s.stream.size), "ingest_documents":
                    len(s.inputs), "merge_stream_tokens": int(s.merge_stream.size)}
        total = args.ingest_kills + args.merge_kills + args.train_kills
        with tqdm(total=total, unit="kill", file=sys.stderr) as bar:
            for name, kills, campaign, extra in (
                    ("ingest", args.ingest_kills, ingest_campaign, {}),
                    ("merge", args.merge_kills, merge_campaign, {}),
                    ("training", args.train_kills, train_campaign,
                     {"steps": args.train_steps})):
                if kills:
                    bar.set_description(name)
                    t0 = time.perf_counter()
                    results[name] = campaign(s, kills, rng, lambda: bar.update(1), **extra)
                    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        if not args.no_hazards:
            results["hazards"] = hazards(s)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["ok"] = all_ok(results)
    summary(results)
    print(f"wall time {results['wall_seconds']:.0f} s; every check held: {results['ok']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
