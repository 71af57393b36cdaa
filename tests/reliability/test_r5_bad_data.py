"""R5 (issue 10): bad data. A folder of 100 captioned images with 5% corrupt or truncated
images, 2% empty or mis-encoded captions and one decompression bomb is trained on (stage 1,
a whole epoch, so every image is decoded): the run finishes, every bad item is named with
its reason in skipped.jsonl, and the end-of-run summary says trained + skipped = total,
also when the images are decoded in DataLoader worker processes (whose finds the main
process never sees) and when the run is resumed after finding some of them."""

import re

import pytest

from bad_inputs import bad_data_folder, one_line_error, skip_report
from ldm.cli.train_vae import main

TOTAL, BATCH = 100, 7  # 98 images with good captions: 14 steps make one epoch


def argv(run, data, *extra):
    return [
        f"train.output_dir={run}", "data.source=folder", f"data.path={data}", "data.resolution=16",
        "data.num_validation=0", "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
        f"train.batch_size={BATCH}", "train.max_steps=14", "train.log_every=7", "scale_samples=7",
        "validation.every=1000", "train.checkpoint_every=1000", *extra,
    ]


def end_summary(out: str):
    """(trained, held out, skipped, total) of the last end-of-run summary line."""
    found = re.findall(r"data at the end of training: (\d+) trained \+ (\d+) held out for validation \+ (\d+) skipped = (\d+) images", out)
    assert found, out[-2000:]
    return tuple(map(int, found[-1]))


def kinds_named(report: dict, bad: dict) -> bool:
    """Each bad item named once, with a reason that says what was wrong with it."""
    words = {"corrupt": "unreadable image", "truncated": "truncated", "bomb": "decompression bomb",
             "empty caption": "empty caption", "Latin-1 caption": "not UTF-8"}
    return set(report) == set(bad) and all(words[kind] in report[path].lower() or words[kind] in report[path]
                                           for path, kind in bad.items())


@pytest.mark.parametrize("workers", [0, 2], ids=["main-process", "2-workers"])
def test_bad_data_is_skipped_named_and_counted(tmp_path, capfd, record, workers):
    bad = bad_data_folder(tmp_path / "data", TOTAL)
    run = tmp_path / "run"
    code = main(argv(run, tmp_path / "data", f"data.num_workers={workers}"))
    out, err = capfd.readouterr()
    report = skip_report(run)
    trained, held_out, skipped, total = end_summary(out)
    # Every skip warning (from the workers too) starts its own line, above tqdm's bar, not inside it.
    warnings = [part for part in re.split(r"[\r\n]", err) if "skipping" in part]
    above_bar = len(warnings) >= 6 and all(w.startswith("skipping ") for w in warnings)
    held = (code == 0 and (run / "final").is_dir() and kinds_named(report, bad)
            and (trained, held_out, skipped, total) == (TOTAL - len(bad), 0, len(bad), TOTAL) and above_bar)
    assert record("R5", f"bad data, decoded in {'the main process' if not workers else f'{workers} DataLoader workers'}",
                  held, detail=f"exit {code}; {trained} trained + {skipped} skipped = {total}; {len(report)} named",
                  named=len(report), planted=len(bad)), (code, report, (trained, held_out, skipped, total), warnings)


def test_a_resumed_run_keeps_the_skips_found_before(tmp_path, capfd, record):
    """Stopped after half an epoch and resumed: the images found bad in the first half stay in the report."""
    bad = bad_data_folder(tmp_path / "data", TOTAL)
    run = tmp_path / "run"
    first = main(argv(run, tmp_path / "data", "train.max_steps=7", "train.checkpoint_every=7"))
    before = skip_report(run)
    second = main(argv(run, tmp_path / "data", "--resume", "auto"))
    out, _ = capfd.readouterr()
    after = skip_report(run)
    counts = end_summary(out)
    held = (first == second == 0 and set(before) <= set(after) and kinds_named(after, bad)
            and counts == (TOTAL - len(bad), 0, len(bad), TOTAL))
    assert record("R5", "bad data, run resumed half-way", held,
                  detail=f"{len(before)} named before the resume, {len(after)} after; {counts}"), (before, after, counts)


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "bucketed"])
def test_undecodable_shard_samples_from_workers_are_reported(tmp_path, capfd, record, vae_dir, buckets):
    """Webdataset shards (4 x 5 samples, 2 of them not images) read by 2 DataLoader workers for one
    epoch of stage 2: both bad samples named in skipped.jsonl and counted at the end, with
    aspect-ratio buckets too (their batches decode in their own path)."""
    from ldm.cli.train_unet import main as train_unet
    from test_train_unet import tiny
    from test_webdataset import write_shards

    (tmp_path / "shards").mkdir()
    pattern = write_shards(tmp_path / "shards", corrupt={3, 14})
    run = tmp_path / "run"
    code = train_unet(tiny(run, vae_dir, "data.source=webdataset", f"data.path={pattern}", "data.num_samples=20",
                           "data.num_validation=0", "data.num_workers=2", "train.max_steps=5",
                           "validation.every=1000", "validation.prompts=[]", f"data.buckets.enabled={str(buckets).lower()}"))
    out, _ = capfd.readouterr()
    report = skip_report(run)
    held = (code == 0 and len(report) == 2 and all(any(k in p for p in report) for k in (".tar:0003", ".tar:0014"))
            and "data: 2 samples skipped as undecodable" in out)
    case = "undecodable webdataset samples, 2 DataLoader workers (stage 2" + (", buckets)" if buckets else ")")
    assert record("R5", case, held,
                  detail=f"exit {code}; named {sorted(p.rsplit('/', 1)[-1] for p in report)}"), (code, report, out[-1500:])


def test_stage1_trains_on_shards_to_the_end(tmp_path, capsys, record):
    """Found by R5: train_vae.py on webdataset shards trained, then died at its first validation
    grid with a NotImplementedError traceback (an IterableDataset has no [i]); its grids and
    latent statistics now read the stream."""
    from test_webdataset import write_shards

    (tmp_path / "shards").mkdir()
    pattern = write_shards(tmp_path / "shards")
    code = main(argv(tmp_path / "run", pattern, "data.source=webdataset", "data.num_samples=20"))
    error = one_line_error(capsys.readouterr().err)
    held = code == 0 and (tmp_path / "run/final").is_dir()
    assert record("R5", "stage 1 on webdataset shards: trains to the end", held, detail=f"exit {code}; {error}"), error
