"""The end of a run and the writes around it: kills after the last checkpoint resume to the uninterrupted run's
metrics (``fit.json``), honest headline numbers (a validation at the last step, ``train/loss`` over a stated
window), a failed write on a real full file system or under a file-size limit is one sentence, stale
temporaries are removed, files get the umask, and two copies of one sweep agree on its summary."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

LMLAB = str(Path(sys.executable).with_name("lmlab"))
SMALL = [*TINY, "batch_size=16", "model.d_model=32", "logger=none"]
END = [*SMALL, "max_steps=6", "checkpoint_every=2", "val_every=4"]
LEFT_ALONE = {".lock", ".hydra", ".summary.lock"}

# Runs ``lmlab <argv>`` in this process and SIGKILLs it at a named point (argv[1]): the kill is exact, not timed.
DRIVER = r'''
import os, signal, sys
from pathlib import Path
point, argv = sys.argv[1], sys.argv[2:]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
import lmlab.io as io
import lmlab.pipeline as pipeline
if point == "checkpoint-rename":  # between the two renames of a checkpoint write: last.ckpt moved away
    replace = os.replace
    def killing_replace(src, dst):
        if Path(dst).name == "last.ckpt" and Path(dst).with_name("previous-last.ckpt").exists():
            die()
        replace(src, dst)
    os.replace = killing_replace
if point in ("fit.json", "model.pt", "results.json"):  # the temporary written whole, killed before its rename
    atomic = io._atomic
    def half(path, write, previous=None):
        if Path(path).name == point:
            return atomic(path, lambda tmp: (write(tmp), die()), previous)
        return atomic(path, write, previous)
    io._atomic = half
if point == "after-model":
    save_model = pipeline.save_model
    pipeline.save_model = lambda *a, **k: (save_model(*a, **k), die())
if point.startswith("eval-"):  # during an evaluation: it has run, its numbers are not yet written
    run = pipeline.run_evaluations
    def killing(evaluators, *args):
        def kill_after(evaluator):
            return lambda *a, **k: (evaluator(*a, **k), die())
        return run({n: kill_after(e) if point == "eval-" + n else e for n, e in evaluators.items()}, *args)
    pipeline.run_evaluations = killing
if point == "done":
    pipeline.mark_done = lambda *a, **k: die()
from lmlab.cli import main
main(argv)
'''


def _runs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("config_resolved.yaml")})


def _metrics(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["metrics"]


def _leftovers(run: Path) -> list[Path]:
    """Hidden files and folders lmlab did not mean to keep (temporaries of a write)."""
    return [p for p in run.rglob(".*") if p.name not in LEFT_ALONE and ".hydra" not in p.parts]


def _env(cache_dir: Path) -> dict:
    return {**os.environ, "LMLAB_CACHE": str(cache_dir)}


# ----- the end of a run is a checkpointed phase -----

def test_kills_after_the_last_checkpoint_rerun_to_the_uninterrupted_metrics(tmp_path, cache_dir):
    env = _env(cache_dir)
    straight = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'a'}", *END], env=env, capture_output=True,
                              text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = _metrics(_runs(tmp_path / "a")[0])
    argv = ["train", f"out_dir={tmp_path / 'b'}", *END]
    points = ["checkpoint-rename", "fit.json", "model.pt", "after-model", "eval-perplexity", "eval-probe",
              "results.json", "done"]
    outputs = {}
    for point in points:  # each rerun resumes what the previous kill left, and is killed at the next point
        proc = subprocess.run([sys.executable, "-c", DRIVER, point, *argv], env=env, capture_output=True, text=True,
                              preexec_fn=lambda: os.umask(0o002))
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        (run,) = _runs(tmp_path / "b")
        assert not (run / "DONE").exists(), point
        outputs[point] = proc.stdout
        if point in ("model.pt", "results.json"):  # the kill left a full-size temporary
            assert any(p.name.startswith(f".tmp-{point}-") for p in run.iterdir()), point
    assert "last.ckpt is missing: resuming from the checkpoint before it, previous-last.ckpt" in outputs["fit.json"]
    final = subprocess.run([LMLAB, "train", *argv[1:]], env=env, capture_output=True, text=True,
                           preexec_fn=lambda: os.umask(0o002))
    assert final.returncode == 0, final.stderr[-2000:]
    (run,) = _runs(tmp_path / "b")
    assert (run / "DONE").exists()
    got = _metrics(run)
    assert got == expected  # bit-identical: train/loss, its window, val/loss and every evaluation
    assert got["train/steps"] == 6 and math.isfinite(got["train/loss"]) and math.isfinite(got["val/loss"])
    assert _leftovers(run) == []  # the temporaries of the killed writes are gone
    for name in ("results.json", "model.pt", "fit.json", "checkpoints/last.ckpt"):  # the umask, not 0600
        assert (run / name).stat().st_mode & 0o777 == 0o664, name


def test_done_is_never_written_without_finite_fit_metrics(lmlab):
    code, out = lmlab("train", *END)
    assert code == 0, out
    (run,) = _runs(lmlab.runs)
    record = json.loads((run / "fit.json").read_text())
    assert record["step"] == 6 and record["metrics"]["val/loss"] == _metrics(run)["val/loss"]
    # a damaged record of the fit: the rerun refuses rather than reporting NaN as done
    record["metrics"]["train/loss"] = float("nan")
    (run / "fit.json").write_text(json.dumps(record))
    for name in ("DONE", "results.json"):
        (run / name).unlink()
    code, out = lmlab("train", *END)
    assert code == 2 and "without finite fit metrics (train/loss=nan)" in out and "rerun" in out
    assert not (run / "DONE").exists() and not (run / "results.json").exists()


# ----- honest headline numbers -----

def _csv_rows(run: Path) -> list[dict]:
    (path,) = run.rglob("metrics.csv")
    return list(csv.DictReader(path.open()))


def test_val_loss_is_a_validation_at_the_last_step_and_train_loss_a_stated_window(lmlab):
    common = [*SMALL, "max_steps=6", "checkpoint_every=6", "logger=csv", "trainer.log_every_n_steps=1"]
    code, out = lmlab("train", *common, "val_every=4")  # periodic validation at step 4 only
    assert code == 0, out
    code, out = lmlab("train", *common, "val_every=2")  # periodic validations at steps 2, 4 and 6
    assert code == 0, out
    stale, every = _runs(lmlab.runs)
    if "val_every=2" in stale.name:
        stale, every = every, stale
    periodic = [(int(r["step"]), float(r["val/loss"])) for r in _csv_rows(every) if r.get("val/loss")]
    last_step = max(s for s, _ in periodic)
    at_last = [v for s, v in periodic if s == last_step][0]
    assert _metrics(every)["val/loss"] == pytest.approx(at_last, abs=1e-7)
    assert _metrics(stale)["val/loss"] == pytest.approx(at_last, abs=1e-7)  # not the step-4 validation
    # train/loss: the mean of every logged batch loss (a 6-step run is shorter than the window)
    losses = [float(r["train/loss"]) for r in _csv_rows(stale) if r.get("train/loss")]
    assert len(losses) == 6
    metrics = _metrics(stale)
    assert metrics["train/loss_window"] == 6
    assert metrics["train/loss"] == pytest.approx(sum(losses) / 6, abs=1e-6)


def test_loss_window_is_the_mean_of_the_last_steps_and_survives_a_checkpoint():
    from lmlab.training.callbacks import LossWindow

    window = LossWindow(window=3)
    assert math.isnan(window.mean()) and window.steps() == 0
    for loss in (5.0, 4.0, 3.0, 2.0, 1.0):
        window.on_train_batch_end(None, None, {"loss": torch.tensor(loss)}, None, 0)
    assert window.steps() == 3 and window.mean() == pytest.approx(2.0)  # (3 + 2 + 1) / 3
    again = LossWindow(window=3)
    again.load_state_dict(window.state_dict())
    again.on_train_batch_end(None, None, {"loss": torch.tensor(0.0)}, None, 0)
    assert again.mean() == pytest.approx(1.0)  # (2 + 1 + 0) / 3


# ----- a failed write is one sentence -----

@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (mounting needs root, or a kernel that lets this user mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: a tmpfs cannot be mounted")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.decode().strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def _one_sentence(out: str, where: Path) -> None:
    lines = [ln for ln in out.splitlines() if ln.startswith("lmlab: error:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert f"could not write into {where}" in lines[0] and "free there" in lines[0], lines[0]


def test_a_full_disk_is_one_sentence_in_every_write_path(small_disk, tmp_path, cache_dir):
    from lmlab.io import WriteFailed, atomic_dir
    from lmlab.run_dir import save_model, write_results
    from lmlab.training.module import AtomicCheckpointIO

    env = _env(cache_dir)
    # training on the small disk: the config fits, the first checkpoint (Lightning's checkpoint IO) does not
    proc = subprocess.run([LMLAB, "train", f"out_dir={small_disk}", *SMALL, "max_steps=4", "checkpoint_every=2",
                           "val_every=2", "model.d_model=64"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    (run,) = _runs(small_disk)
    _one_sentence(proc.stderr, run)
    assert not (run / "DONE").exists() and _leftovers(run) == []
    assert not list(run.rglob("*.ckpt"))
    # the data cache on a full disk
    (small_disk / "cache").mkdir()
    _fill(small_disk, 8 << 10)
    proc = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'runs'}", *SMALL, "max_steps=2", "seed=3",
                           "data.train_size=3000"], env={**env, "LMLAB_CACHE": str(small_disk / "cache")},
                          capture_output=True, text=True)
    assert proc.returncode == 2
    _one_sentence(proc.stderr, small_disk / "cache")
    assert [p.name for p in (small_disk / "cache").iterdir()] == []
    # results, model.pt, a checkpoint, an export (safetensors): each one sentence, nothing left
    target = small_disk / "run"
    big = {"w": torch.zeros(1 << 16)}
    writes = {
        "results": lambda: write_results(target, {"metrics": {}, "blob": "x" * (64 << 10)}),
        "model": lambda: save_model(target, torch.nn.Linear(256, 256), vocab_size=4, attention="causal"),
        "checkpoint": lambda: AtomicCheckpointIO().save_checkpoint({"state_dict": big}, target / "c" / "last.ckpt"),
        "safetensors": lambda: _safetensors_into(atomic_dir, target / "hf", big),
    }
    for what, write in writes.items():
        with pytest.raises(WriteFailed, match=r"could not write into .* free there") as caught:
            write()
        assert str(small_disk) in str(caught.value), what
        assert not [p for p in small_disk.rglob("*") if p.name.startswith(".tmp-")], what
    assert not (target / "results.json").exists() and not (target / "model.pt").exists()


def _safetensors_into(atomic_dir, out: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / "model.safetensors")


def test_a_file_size_limit_is_one_sentence(tmp_path, cache_dir):
    env = _env(cache_dir)
    args = [*SMALL, "max_steps=4", "checkpoint_every=2", "val_every=2", "model.d_model=64"]
    warm = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'warm'}", *args], env=env, capture_output=True,
                          text=True)  # the data cache is written without a limit
    assert warm.returncode == 0, warm.stderr[-2000:]

    def limit() -> None:  # SIGXFSZ ignored (kept across exec): a write past the limit returns EFBIG
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))

    proc = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'runs'}", *args], env=env, capture_output=True,
                          text=True, preexec_fn=limit)
    assert proc.returncode == 2
    (run,) = _runs(tmp_path / "runs")
    _one_sentence(proc.stderr, run)
    assert "file-size limit of 256.0 KiB (ulimit -f)" in proc.stderr
    assert not (run / "DONE").exists() and _leftovers(run) == []


# ----- leftovers -----

def test_stale_temporaries_go_and_live_ones_stay(tmp_path):
    import fcntl

    from lmlab.io import remove_stale, write_json

    stale_file, stale_dir = tmp_path / ".tmp-last.ckpt-abc", tmp_path / ".tmp-hf-xyz"
    stale_file.write_bytes(b"x" * 1000)
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"y")
    live = tmp_path / ".tmp-results.json-live"
    live.write_text("{}")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # being written by a process
    old = time.time() - 60
    for p in (stale_file, stale_dir, live):
        os.utime(p, (old, old))
    try:
        write_json(tmp_path / "results.json", {"a": 1})  # any write into the folder clears what a kill left
        assert not stale_file.exists() and not stale_dir.exists() and live.exists()
    finally:
        os.close(fd)
    assert remove_stale(tmp_path) == [live]  # no longer held


def test_files_and_folders_get_the_umask(tmp_path):
    from lmlab.io import atomic_dir, torch_save, write_json

    previous = os.umask(0o027)
    try:
        write_json(tmp_path / "r.json", {})
        torch_save({"w": torch.zeros(2)}, tmp_path / "m.pt")
        with atomic_dir(tmp_path / "entry") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "entry").stat().st_mode & 0o777 == 0o750


def test_a_killed_export_leaves_nothing_on_the_next_export(lmlab):
    from lmlab.export import export_run

    code, out = lmlab("train", *SMALL, "max_steps=2", "checkpoint_every=2", "val_every=2", "eval=[]")
    assert code == 0, out
    (run,) = _runs(lmlab.runs)
    stale = run / ".tmp-hf-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    old = time.time() - 60
    os.utime(stale, (old, old))
    out = export_run(run)
    assert (out / "config.json").exists() and not stale.exists()
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp-")] == []


# ----- sweeps -----

def test_summary_rows_follow_the_swept_values(tmp_path):
    from lmlab.report.summary import gather, write_summary

    for name, width, lr in (("a", 128, "3e-3"), ("b", 16, "1e-3"), ("c", 8, "3e-3"), ("d", 16, "3e-4")):
        hydra = tmp_path / name / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(f"- model.d_model={width}\n- optim.lr={lr}\n")
    rows = gather(tmp_path)
    assert [(r["model.d_model"], r["optim.lr"]) for r in rows] == [("8", "3e-3"), ("16", "3e-4"), ("16", "1e-3"),
                                                                    ("128", "3e-3")]
    write_summary(tmp_path)
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["job"] for r in table] == ["c", "d", "b", "a"]


def test_the_summary_is_written_under_the_sweep_lock(tmp_path):
    import fcntl

    from lmlab.report.summary import SUMMARY_LOCK, write_summary

    (tmp_path / "j" / ".hydra").mkdir(parents=True)
    (tmp_path / "j" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    fd = os.open(tmp_path / SUMMARY_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is rebuilding the summary
    writer = threading.Thread(target=write_summary, args=(tmp_path,))
    writer.start()
    time.sleep(0.5)
    assert writer.is_alive() and not (tmp_path / "summary.csv").exists()
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    writer.join(10)
    assert not writer.is_alive() and (tmp_path / "summary.csv").exists()


# Loaded by every Python process of the first copy of the sweep: its jobs wait at their evaluations for a gate
# file, so that the second copy runs while the first holds a job (the order is fixed, not timed).
GATE = r'''
import os, time
from pathlib import Path
import lmlab.pipeline as pipeline
run_evaluations = pipeline.run_evaluations
def gated(*args, **kwargs):
    while not Path(os.environ["LMLAB_TEST_GATE"]).exists():
        time.sleep(0.05)
    return run_evaluations(*args, **kwargs)
pipeline.run_evaluations = gated
'''


@pytest.mark.parametrize("launcher", [[], ["launcher=local", "hydra.launcher.n_jobs=1"]], ids=["basic", "local"])
def test_two_copies_of_one_sweep_agree_and_neither_fails_for_the_other(tmp_path, cache_dir, launcher):
    from lmlab.run_dir import is_held

    hook, gate, out = tmp_path / "hook", tmp_path / "go", tmp_path / "runs"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATE)
    env = _env(cache_dir)
    gated = {**env, "LMLAB_TEST_GATE": str(gate), "PYTHONPATH": os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])}
    args = [LMLAB, "train", "-m", f"out_dir={out}", *SMALL, "max_steps=4", "checkpoint_every=4", "val_every=4",
            "eval=[perplexity]", "seed=0,1", *launcher]
    first = subprocess.Popen(args, env=gated, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any(is_held(p.parent) for p in out.rglob(".lock")):
            assert first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.05)
        second = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # the second copy trains the job the first does not hold, then (today) ends; the first is let go after that
        while time.time() < deadline and second.poll() is None and len(list(out.rglob("DONE"))) < 1:
            time.sleep(0.05)
    finally:
        gate.touch()
    out_second = second.communicate(timeout=300)[0]
    out_first = first.communicate(timeout=300)[0]
    assert second.returncode == 0, out_second[-3000:]
    assert first.returncode == 0, out_first[-3000:]
    (summary,) = out.rglob("summary.csv")
    rows = list(csv.DictReader(summary.open()))
    assert [r["status"] for r in rows] == ["done", "done"] and [r["seed"] for r in rows] == ["0", "1"]
