"""Cached means verified: a DONE marker vouches for the files its stage wrote.

A truncated, deleted or replaced artifact behind a DONE marker makes its stage redo the
work (and everything downstream rerun, since the marker changes), a damaged input stops
its consumer with one line naming the command that redoes it, and an unreadable marker
counts as not done instead of failing every rerun.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.extractor.__main__ import EXTRACT
from services.extractor.probe import build_probe, ensure_probe
from services.trainer.__main__ import TRAIN
from shared import layout
from shared.data import load_task
from shared.done import RecordingStore
from shared.errors import ArtifactNotFound
from shared.models import load_model
from shared.stage import load_run_spec, stage_main
from shared.store import Store, open_store
from shared.tokenizer import load_tokenizer
from tests.support import register_run, run_stage_here
from tests.toy_stage import TOY

SPEC = {
    "data.train_samples": 128,
    "data.eval_samples": 16,
    "train.batch_size": 8,
    "train.steps": 20,
    "train.checkpoint_every": 10,
    "train.dynamics_every": 10,
    "train.warmup_steps": 2,
    "extract.probe_samples": 16,
    "extract.batch_size": 8,
}
FINAL = 20


def _train(store: Store, run_id: str) -> str:
    """Run the trainer in process; returns the state its status object ends in."""
    proc = run_stage_here(TRAIN, ["--run", run_id, "--store", store.url])
    assert proc.returncode == 0, proc.stderr
    return str(store.get_json(layout.status_key(run_id, "train"))["state"])


def _trained(store: Store) -> str:
    run_id = register_run(store, SPEC)
    assert _train(store, run_id) == "succeeded"
    return run_id


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """One trained run in a folder store, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("verified") / "store"
    return root, _trained(open_store(root))


@pytest.fixture
def trained(trained_folder, tmp_path):
    root, run_id = trained_folder
    shutil.copytree(root, tmp_path / "store")
    return open_store(tmp_path / "store"), run_id


@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_truncated_final_model_is_retrained(backend, trained, request):
    if backend == "s3":
        store = open_store(request.getfixturevalue("s3_store_url"))
        run_id = _trained(store)
    else:
        store, run_id = trained
    key = layout.checkpoint_model_key(run_id, FINAL)
    whole = store.sha256(key)
    store.put_bytes(key, store.get_bytes(key)[:1000])

    assert _train(store, run_id) == "succeeded"  # not "cached"
    assert store.sha256(key) == whole  # resumed from step 10: bit-identical on the CPU
    assert load_model(store, run_id, FINAL) is not None
    assert _train(store, run_id) == "cached"


def test_model_replaced_by_other_values_is_caught_by_the_digest(trained):
    store, run_id = trained
    key = layout.checkpoint_model_key(run_id, FINAL)
    whole, size = store.sha256(key), store.size(key)
    tensors, metadata = store.get_tensors(key)
    store.put_tensors(key, {name: t * 2 for name, t in tensors.items()}, metadata)
    assert store.size(key) == size and store.sha256(key) != whole  # only the digest tells

    assert _train(store, run_id) == "succeeded"
    assert store.sha256(key) == whole


def test_deleted_checkpoint_done_is_redone_not_cached(trained):
    store, run_id = trained
    done = layout.checkpoint_done_key(run_id, 10)
    store.delete(done)

    assert _train(store, run_id) == "succeeded"
    marker = store.get_json(done)
    assert layout.checkpoint_model_key(run_id, 10) in marker["artifacts"]
    assert (
        layout.checkpoint_done_key(run_id, 10)
        in store.get_json(layout.train_done_key(run_id))["artifacts"]
    )
    assert _train(store, run_id) == "cached"


#: Empty, garbage, not an object, and a checkpoint DONE as written before format 2.
@pytest.mark.parametrize("content", [b"", b"\x00{garbage", b'["a list"]', b'{"step": 20}'])
@pytest.mark.parametrize("which", ["train", "checkpoint"])
def test_unreadable_done_counts_as_not_done(trained, which, content):
    store, run_id = trained
    key = (
        layout.train_done_key(run_id)
        if which == "train"
        else layout.checkpoint_done_key(run_id, FINAL)
    )
    store.put_bytes(key, content)

    assert _train(store, run_id) == "succeeded"
    assert store.get_json(key)["format"] == 2


def test_damaged_extraction_is_redone_and_downstream_reruns(trained, tmp_path, monkeypatch):
    store, run_id = trained
    work_log = tmp_path / "toy-work.log"
    monkeypatch.setenv("TOY_WORK_LOG", str(work_log))
    store_args = ["--run", run_id, "--store", store.url]
    assert stage_main(EXTRACT, store_args) == 0
    assert stage_main(TOY, store_args) == 0  # reads extraction step 0
    key = layout.extract_layer_key(run_id, 0, 1)
    data = store.get_bytes(key)
    store.put_bytes(key, data[: len(data) // 2])

    consumer = run_stage_here(TOY, store_args)
    assert consumer.returncode == 2
    line = consumer.stderr.strip().splitlines()[-1]
    assert store.url_of(key) in line and "python -m services.extractor" in line, line
    assert "--step 0" in line, line

    assert stage_main(EXTRACT, store_args) == 0
    states = {
        step: store.get_json(layout.status_key(run_id, "extract", f"step-{step}"))["state"]
        for step in (0, 10, 20)
    }
    assert states == {0: "succeeded", 10: "cached", 20: "cached"}
    assert store.get_bytes(key) == data
    assert key in store.get_json(layout.extract_done_key(run_id, 0))["artifacts"]
    assert stage_main(TOY, store_args) == 0
    assert work_log.read_text().splitlines() == ["worked", "worked"]  # it reran


@pytest.mark.parametrize("content", [b"", b"not json"])
def test_unreadable_input_done_is_one_line_naming_its_command(store, content, monkeypatch):
    run_id = register_run(store, SPEC)
    store.put_bytes(layout.extract_done_key(run_id, 0), content)
    monkeypatch.setenv("TOY_WORK_LOG", "/dev/null")

    proc = run_stage_here(TOY, ["--run", run_id, "--store", store.url])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "is unreadable" in line and "python -m services.extractor" in line, line


def test_an_input_of_the_right_size_with_other_values_stops_its_reader(trained):
    """Sizes are all a consumer checks before it starts; the digest is checked as it reads,
    so a same-size checkpoint with other values is refused before anything is computed."""
    store, run_id = trained
    key = layout.checkpoint_model_key(run_id, 10)
    tensors, metadata = store.get_tensors(key)
    store.put_tensors(key, {name: t * 2 for name, t in tensors.items()}, metadata)
    args = ["--run", run_id, "--store", store.url, "--step", "10"]

    proc = run_stage_here(EXTRACT, args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert store.url_of(key) in line and "another sha256" in line, line
    assert "python -m services.trainer" in line, line
    assert not store.exists(layout.extract_done_key(run_id, 10))

    assert _train(store, run_id) == "succeeded"  # the way out the line names
    assert run_stage_here(EXTRACT, args).returncode == 0


def test_a_probe_left_by_a_killed_step_is_rewritten_and_every_step_vouches_for_it(trained):
    """The probe is written by whichever extract step comes first; killed before its DONE,
    that step leaves a probe no marker lists, which the next step must not trust."""
    store, run_id = trained
    key = layout.probe_key(run_id)
    args = ["--run", run_id, "--store", store.url]
    assert stage_main(EXTRACT, [*args, "--step", "0"]) == 0
    whole = store.get_tensors(key)
    store.delete(layout.extract_done_key(run_id, 0))  # as if killed before its DONE
    data = store.get_bytes(key)
    store.put_bytes(key, data[: len(data) // 2])

    assert stage_main(EXTRACT, args) == 0
    tensors, metadata = store.get_tensors(key)
    assert metadata == whole[1] and all(torch.equal(tensors[k], v) for k, v in whole[0].items())
    for step in (0, 10, 20):  # written or kept, every step's marker lists the probe it used
        assert key in store.get_json(layout.extract_done_key(run_id, step))["artifacts"]


class _OtherStep(RecordingStore):
    """A step's store beside which another extract step writes the same probe (its own
    bytes) at the moment `other_step_writes` is called."""

    winners_sha256 = ""

    def other_step_writes(self, key: str, run_id: str) -> None:
        spec = load_run_spec(self.inner, run_id)
        probe = build_probe(spec, load_task(spec.data), load_tokenizer(spec.data.tokenizer))
        self.inner.put_tensors(key, probe.tensors(), metadata=probe.metadata())
        self.winners_sha256 = self.inner.sha256(key)  # what the other step's DONE lists


def test_a_step_that_loses_the_race_to_write_the_probe_vouches_for_the_winners_bytes(trained):
    """Extract steps run side by side and safetensors orders metadata per process, so two
    steps' equal probes differ in bytes: exactly one may write it, and both must list it."""
    store, run_id = trained
    key = layout.probe_key(run_id)

    class Racing(_OtherStep):
        """A step whose atomic create finds another step's probe already there."""

        def _put_bytes_if_absent(self, key: str, data: bytes) -> bool:
            self.other_step_writes(key, run_id)
            return super()._put_bytes_if_absent(key, data)

    store.delete(key)
    racing = Racing(store, layout.run_prefix(run_id))
    ensure_probe(racing, run_id, load_run_spec(store, run_id))
    # not overwritten, and vouched for as it is: the other step's marker still holds
    assert racing.winners_sha256 == store.sha256(key) == racing.artifacts()[key]["sha256"]


def test_a_probe_created_by_another_step_after_this_one_looked_is_not_deleted(trained):
    """This step finds no probe; another creates it before this one's atomic create: the
    other's probe is whole, not damaged, and must stay (the S3 end-to-end run caught a
    step that took it for damaged and replaced it)."""
    store, run_id = trained
    key = layout.probe_key(run_id)

    class LateWinner(_OtherStep):
        @contextlib.contextmanager
        def _local_copy(self, key: str) -> Iterator[Path]:
            if not self.winners_sha256:  # the first read finds nothing; then the other writes
                self.other_step_writes(key, run_id)
                raise ArtifactNotFound(f"{key} is not there yet")
            with super()._local_copy(key) as path:
                yield path

    store.delete(key)
    late = LateWinner(store, layout.run_prefix(run_id))
    ensure_probe(late, run_id, load_run_spec(store, run_id))
    assert late.winners_sha256 == store.sha256(key) == late.artifacts()[key]["sha256"]
