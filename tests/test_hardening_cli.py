"""The CLI attacks of the hardening report, each reproduced first: data loss, huge counts,
tracebacks, and messages that reveal which folders exist or what a file contains."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mosaic_core import limits
from mosaic_core.cli import main
from mosaic_core.models.registry import resolve_model

PRUNE = ["--sparsity", "0.4", "--steps", "10", "--calib-size", "8", "--calib-source", "samples"]


def run(argv: list[str]) -> int:
    """`main(argv)` with argparse's exits turned into return codes."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prune_never_deletes_files_it_did_not_write(tiny_pixel_folder, tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("my thesis")
    (victim / "sub" / "data.csv").write_text("1,2,3")
    before = snapshot(victim)
    assert run(["prune", "--model", str(tiny_pixel_folder), *PRUNE, "--out", str(victim)]) == 2
    line = one_error_line(capsys)
    assert str(victim) in line and "notes.txt" in line and "sub" in line
    assert snapshot(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]  # refused before any temp folder
    # a new folder is written, and an earlier checkpoint may be replaced by a new one
    out = tmp_path / "ckpt"
    assert run(["prune", "--model", str(tiny_pixel_folder), *PRUNE, "--out", str(out)]) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert run(["prune", "--model", str(tiny_pixel_folder), *PRUNE[:1], "0.2", *PRUNE[2:], "--out", str(out)]) == 0
    second = json.loads((out / "manifest.json").read_text())
    assert first["plan"]["requested_sparsity"] == pytest.approx(0.4)
    assert second["plan"]["requested_sparsity"] == pytest.approx(0.2)
    assert second["format_version"] == 4 and len(second["content_sha256"]) == 64  # prune refits by default: v4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "victim"]  # no temporary leftovers


def test_prune_refuses_bad_out_paths_before_any_work(tiny_pixel_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    for out, words in (("", "must be a folder path"), ("a-file", "is not a folder"), ("a-file/inside", "is a file, not a folder")):
        assert run(["prune", "--model", str(tiny_pixel_folder), *PRUNE, "--out", out]) == 2
        assert words in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no stray ..<random>.tmp folder


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder nobody may write in")
def test_an_unwritable_parent_is_refused_before_any_work_even_for_root(capsys):
    """Permission bits let root write anywhere, yet /proc refuses every new file: the path check
    tries a file, so `sample` (which would sample first) and `prune` stop at once, naming it."""
    assert run(["sample", "--model", "digits-dit", "--n", "2", "--out", "/proc/mosaic-out/x.npz"]) == 2
    assert "cannot write in '/proc'" in one_error_line(capsys)
    assert run(["prune", "--model", "digits-dit", "--sparsity", "0.3", "--out", "/proc/mosaic-out"]) == 2
    assert "cannot write in '/proc'" in one_error_line(capsys)


def test_train_refuses_a_folder_of_other_files_before_training(tmp_path, capsys):
    from mosaic_core.models.training import TrainConfig, train_digits_dit

    (tmp_path / "keep.me").write_text("precious")
    assert run(["train", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "keep.me" in one_error_line(capsys)
    with pytest.raises(ValueError, match="already holds files"):
        next(train_digits_dit(tmp_path, TrainConfig(steps=1)))  # refused at the first step, not after training
    assert snapshot(tmp_path) == {"keep.me": b"precious"}


@pytest.mark.parametrize(
    "argv, words",
    [
        (["sample", "--n", "1000000000", "--out", "x.npz"], ["--n", f"[1, {limits.MAX_SAMPLE_IMAGES}]", "1000000000"]),
        (["sample", "--n", "-5", "--out", "x.npz"], ["--n", "[1,"]),
        (["sample", "--steps", "99999999999999999999", "--out", "x.npz"], ["--steps", f"[1, {limits.MAX_STEPS}]"]),
        (["sample", "--seed", "1e400", "--out", "x.npz"], ["--seed"]),
        (["prune", "--calib-size", "100000000", "--out", "o"], ["--calib-size", f"[1, {limits.MAX_CALIBRATION_SIZE}]"]),
        (["train", "--steps", "10000000000", "--out", "o"], ["--steps", f"[1, {limits.MAX_TRAIN_STEPS}]"]),
        (["plan", "--model", "m" * 100_000], ["--model", "100000 characters", str(limits.MAX_NAME_LENGTH)]),
        (["sample", "--out", "p" * 100_000 + ".npz"], ["--out", str(limits.MAX_PATH_LENGTH)]),
    ],
)
def test_size_bearing_options_are_bounded_while_parsing(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tracemalloc.start()
    try:
        code = run(argv)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 2 and peak < 50 * 2**20
    line = one_error_line(capsys)
    assert all(word in line for word in words), line
    assert len(line) < 1000
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_bad_outputs_and_metrics_before_sampling(tiny_pixel_folder, tmp_path, capsys):
    (tmp_path / "dir.npz").mkdir()
    model = ["--model", str(tiny_pixel_folder), "--steps", "2"]
    assert run(["sample", *model, "--out", str(tmp_path / "dir.npz")]) == 2
    assert "is a folder" in one_error_line(capsys)
    assert run(["sample", *model, "--out", str(tmp_path / "ok.npz"), "--grid", str(tmp_path / "dir.npz")]) == 2
    assert "--grid" in one_error_line(capsys)
    assert run(["sample", *model, "--metrics", "--n", "1", "--out", str(tmp_path / "ok.npz")]) == 2
    assert "--n of at least 2" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.npz"]  # nothing sampled, nothing written


class WorkStarted(Exception):
    """Raised by the stand-ins below: a command reached model or image work."""


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or reading images raises `WorkStarted` (not a ValueError, so the CLI does
    not turn it into an error line): a refusal seen with this fixture came before any work."""

    def refuse(*args, **kwargs):
        raise WorkStarted("work started before --out was checked")

    monkeypatch.setattr("mosaic_core.models.loading.load_model", refuse)
    monkeypatch.setattr("mosaic_core.conquer.evaluation.load_image_set", refuse)


def test_tune_and_eval_refuse_a_folder_as_out_before_any_work(tmp_path, no_work, capsys):
    """`tune --out DIR` used to tune for minutes, then fail naming an internal temporary file;
    `eval --out d.json` (a folder) likewise after computing. Both now stop at once, naming the path."""
    (tmp_path / "out").mkdir()
    (tmp_path / "d.json").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(["tune", "--model", "digits-dit", "--budget", "0.5", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"--out '{tmp_path / 'out'}' is a folder: give a file name" in line and ".tmp" not in line
    np.savez(tmp_path / "gen.npz", images=np.zeros((2, 8, 8, 1), np.uint8), labels=np.zeros(2, np.int64))
    for out, words in ((tmp_path / "d.json", "is a folder: give a file name"), (tmp_path / "d.txt", "must name a .json file")):
        assert run(["eval", str(tmp_path / "gen.npz"), "--model", "digits-dit", "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"'{out}'" in line and words in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "gen.npz"])  # nothing written


def test_bench_refuses_a_file_or_a_users_folder_before_any_work(tmp_path, no_work, capsys):
    """`bench --out FILE` used to benchmark, then fail with "File exists"; `bench --out DIR` with the
    user's own bench.md overwrote it. Both are refused first; an earlier bench's folder is still taken."""
    import shutil

    bench = ["bench", "--model", "digits-dit", "--sparsity", "0.3", "--n", "2"]
    (tmp_path / "a-file").write_text("mine")
    assert run([*bench, "--out", str(tmp_path / "a-file")]) == 2
    line = one_error_line(capsys)
    assert f"--out '{tmp_path / 'a-file'}' exists and is not a folder" in line and "earlier bench" in line
    user = tmp_path / "user"
    user.mkdir()
    (user / "bench.md").write_text("my own notes")
    (user / "bench.json").write_text(json.dumps({"mine": True}))  # not a report bench wrote
    before = snapshot(tmp_path)
    for argv in (bench, [*bench, "--random-weights"]):
        assert run([*argv, "--out", str(user)]) == 2
        line = one_error_line(capsys)
        assert f"--out '{user}' already holds files this command did not write (bench.json, bench.md)" in line
        assert "a new or empty folder, or one an earlier bench wrote" in line
    assert snapshot(tmp_path) == before
    # an earlier bench's folder (a shipped report, its samples, a killed write's leftover) passes the check...
    earlier = tmp_path / "earlier"
    shutil.copytree(Path(__file__).resolve().parent.parent / "assets" / "bench" / "bench-0.3", earlier)
    (earlier / "dense.npz").write_bytes(b"")
    (earlier / ".bench.md.mosaic-999999-abc.tmp").write_bytes(b"")
    with pytest.raises(WorkStarted):
        run([*bench, "--out", str(earlier)])
    # ...but not with a file of the user's beside it
    (earlier / "notes.txt").write_text("mine")
    assert run([*bench, "--out", str(earlier)]) == 2
    assert "(notes.txt)" in one_error_line(capsys)


def test_a_malformed_manifest_is_one_error_line(tiny_pixel_folder, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text(json.dumps({"format": "mosaicdiff-pruned", "format_version": 2}))
    argv = ["sample", "--model", str(tiny_pixel_folder), "--pruned", str(checkpoint), "--out", str(tmp_path / "x.npz")]
    assert run(argv) == 2
    assert "'base_model' is missing" in one_error_line(capsys)
    (checkpoint / "manifest.json").write_text("[1, 2")
    assert run(argv) == 2
    assert "damaged manifest" in one_error_line(capsys)
    assert not (tmp_path / "x.npz").exists()


def test_refused_folders_look_alike_and_config_contents_are_never_echoed(tiny_pixel_folder, tmp_path, capsys):
    secret = "SECRET-7f3a9c"
    (tmp_path / "plain-folder").mkdir()
    (tmp_path / "a-file").write_text(secret)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "scheduler_config.json").write_text(f"{secret} not json")
    as_list = tmp_path / "as-list"
    as_list.mkdir()
    (as_list / "scheduler_config.json").write_text(json.dumps([secret]))

    def message(name: str, **kwargs) -> str:
        with pytest.raises(ValueError) as error:
            resolve_model(name, **kwargs)
        return str(error.value).replace(name, "NAME")

    refused = [tmp_path / "missing", tmp_path / "plain-folder", tmp_path / "a-file"]
    messages = {message(str(p)) for p in refused}
    # behind allowed roots (a server) a folder with a broken config looks like any other refused one
    messages |= {message(str(p), allowed_roots=[tmp_path]) for p in (garbage, as_list)}
    messages.add(message(str(tiny_pixel_folder), allowed_roots=[tmp_path]))  # a real model outside the roots
    assert len(messages) == 1, messages
    assert secret not in messages.pop()
    # the CLI reads any folder: it names the file that is not a config, and still never what it holds
    for folder in (garbage, as_list):
        told = message(str(folder))
        assert "NAME': scheduler_config.json is not a readable JSON object" in told and secret not in told
    # fields the engine reads are checked, by name only
    bad_field = tmp_path / "bad-field"
    bad_field.mkdir()
    (bad_field / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": secret, "beta_schedule": "linear"}))
    with pytest.raises(ValueError, match="num_train_timesteps") as error:
        resolve_model(str(bad_field))
    assert secret not in str(error.value)
    (bad_field / "scheduler_config.json").write_text(json.dumps({"beta_schedule": secret}))
    with pytest.raises(ValueError, match="beta_schedule") as error:
        resolve_model(str(bad_field))
    assert secret not in str(error.value)
    (bad_field / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 10**9}))
    with pytest.raises(ValueError, match=r"num_train_timesteps.*\[2, 100000\]"):
        resolve_model(str(bad_field))  # refused before a 10^9-long schedule is built
    # the same through the CLI: one line, no traceback, no secret
    assert run(["plan", "--model", str(garbage)]) == 2
    line = one_error_line(capsys)
    assert secret not in line and "scheduler_config.json is not a readable JSON object" in line
    (garbage / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    (garbage / "transformer").mkdir()
    (garbage / "transformer" / "config.json").write_text(f"{secret} not json")  # the walk's case: a broken denoiser config
    assert run(["plan", "--model", str(garbage)]) == 2
    line = one_error_line(capsys)
    assert secret not in line and "transformer/config.json is not a readable JSON object" in line and "scheduler" not in line


def test_allowed_roots_admit_only_folders_inside_them(tiny_pixel_folder, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    inside = root / "tiny"
    inside.symlink_to(tiny_pixel_folder)  # a link inside a root that points outside it
    assert resolve_model(str(tiny_pixel_folder)).path == str(tiny_pixel_folder)  # None: anything, as for the CLI
    assert resolve_model(str(tiny_pixel_folder), allowed_roots=[tiny_pixel_folder.parent]).shape.num_heads == 4
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model(str(inside), allowed_roots=[root])
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model(str(root / ".." / ".." / tiny_pixel_folder.name), allowed_roots=[root])
    assert resolve_model("digits-dit", allowed_roots=[]).name == "digits-dit"  # registry names need no root


@pytest.mark.slow
def test_prune_cache_reuses_the_analyses_and_writes_the_same_networks(tiny_pixel_folder, tmp_path, capsys):
    """A second prune with --cache gathers no Hessians, and its networks equal those of a prune without the cache."""
    cache = tmp_path / "cache"
    model = ["prune", "--model", str(tiny_pixel_folder), *PRUNE[2:]]
    assert run([*model, "--sparsity", "0.4", "--cache", str(cache), "--out", str(tmp_path / "a")]) == 0
    analyses = sorted(p.name for p in (cache / "analyses").iterdir())
    assert analyses
    capsys.readouterr()
    assert run([*model, "--sparsity", "0.3", "--cache", str(cache), "--out", str(tmp_path / "b")]) == 0
    assert "calibrate 0.0 s, hessian 0.0 s" in capsys.readouterr().out
    assert sorted(p.name for p in (cache / "analyses").iterdir()) == analyses
    assert run([*model, "--sparsity", "0.3", "--out", str(tmp_path / "c")]) == 0  # no cache: gathered afresh
    cached, fresh = snapshot(tmp_path / "b"), snapshot(tmp_path / "c")
    networks = [name for name in cached if name.endswith(".safetensors")]
    assert networks and all(cached[name] == fresh[name] for name in networks)
    assert run([*model, "--sparsity", "0.3", "--stages", "4", "--cache", str(cache), "--out", str(tmp_path / "d")]) == 2
    assert "--cache keeps three-stage analyses" in one_error_line(capsys)


@pytest.mark.parametrize(
    "model, extra, words",
    [
        ("flux-schnell", ["--prompt", "a cat", "--negative-prompt", "blur"], "is guidance-distilled (Flux): it runs no unconditional branch for --negative-prompt"),
        ("flux-schnell", ["--prompt", "a cat", "--cfg", "2"], "--cfg must be 1 for model 'flux-schnell', got 2"),
        ("sd3-medium", ["--prompt", "  "], "is text-to-image: give --prompt"),
        ("sd3-medium", [], "is text-to-image: give --prompt"),
        ("digits-dit", ["--prompt", "a seven"], "is class-conditional: --prompt is for text-to-image models"),
        ("digits-dit", ["--negative-prompt", "blur"], "is class-conditional: --negative-prompt is for text-to-image models"),
    ],
)
def test_sample_refuses_conditioning_the_model_cannot_take_before_it_loads(tmp_path, no_work, capsys, model, extra, words):
    """These were found after loading the model (minutes for a real checkpoint), and Flux's
    negative prompt was refused in the engine's words ("negative_prompt"), not the flag's."""
    assert run(["sample", "--model", model, "--n", "1", "--out", str(tmp_path / "x.npz"), *extra]) == 2
    assert words in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_tune_refuses_edges_out_of_range_before_any_work(no_work, capsys):
    assert run(["tune", "--model", "digits-dit", "--budget", "0.5", "--edges", "600,150"]) == 2
    assert "HI < 1000 (training timesteps), got 600,150" in one_error_line(capsys)


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.3"], ["tune", "--budget", "0.5"]])
@pytest.mark.parametrize(
    "model, source, words",
    [
        ("sd3-medium", "folder:{tmp}/none", "calibration folder '{tmp}/none' does not exist: give folder:PATH of an existing folder"),
        ("sd3-medium", "folder:{tmp}", "calibration folder '{tmp}' has no .png/.jpg/.jpeg/.webp/.bmp images"),
        ("sd3-medium", "data", "model 'sd3-medium' has no built-in dataset: use calibration source 'samples' (data-free) or 'folder:PATH'"),
        ("digits-dit", "folder:{tmp}", "calibration source 'folder:{tmp}' needs a text-to-image model"),
    ],
)
def test_a_calibration_source_that_cannot_serve_is_refused_before_the_model_loads(tmp_path, no_work, capsys, command, model, source, words):
    """A missing calibration folder was found after loading the checkpoint (minutes for a real one)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [*command, "--model", model, "--calib-source", source.format(tmp=empty)]
    if command[0] == "prune":
        argv += ["--out", str(tmp_path / "ck")]
    assert run(argv) == 2
    assert words.format(tmp=empty) in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
