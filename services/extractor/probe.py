"""The run's fixed probe set: which held-out sequences go through the model, which tokens stay.

The probe is a pure function of the spec's `data` and `extract` sections, so the pods of a
fan-out (one per checkpoint) that race to create it write identical bytes, and every
checkpoint is read at exactly the same tokens.

Sequences are ordered by length (ties by sample index) and the kept tokens follow that
order: a batch of consecutive sequences then owns one contiguous block of rows in every
layer file, which the writer stores with one write per batch instead of one per token.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Literal

import torch

from shared import hidden, layout, stage_registry
from shared.data import Task, answer_starts, load_task, tokenize_examples
from shared.done import RecordingStore
from shared.errors import ArtifactNotFound, DriftlabError
from shared.hidden import ExtractionError, Probe
from shared.spec import RunSpec, section_digest
from shared.store import Store
from shared.store_tensors import safetensors_bytes
from shared.tokenizer import Tokenizer, load_tokenizer


def probe_digest(spec: RunSpec) -> str:
    """What the probe depends on: the dataset and the extract settings that pick tokens."""
    parts = {
        "data": section_digest(spec, "data"),
        "extract": {
            key: getattr(spec.extract, key)
            for key in ("probe_samples", "token_policy", "random_k", "max_tokens_per_layer", "seed")
        },
    }
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def ensure_probe(store: Store, run_id: str, spec: RunSpec) -> Probe:
    """This spec's probe, built afresh and stored unless the store already holds it.

    Building is cheap and deterministic, and the probe is written by whichever extract step
    comes first: a step killed after writing it leaves it vouched for by no DONE marker, so
    no step trusts the stored one without comparing it. Steps run side by side (a pod per
    checkpoint), and safetensors writes metadata in a per-process order, so equal probes
    differ in bytes: the probe is created atomically (`put_bytes_if_absent`), exactly one
    step's bytes win, and every step's DONE marker lists those bytes (written or kept). A
    damaged probe is deleted and created again.
    """
    probe = build_probe(spec, load_task(spec.data), load_tokenizer(spec.data.tokenizer))
    key = layout.probe_key(run_id)
    stored = _compare(store, key, probe)
    if stored != "same":
        if stored == "differs":  # damaged or of an older format (a fresh one reads "same")
            store.delete(key)
        data = safetensors_bytes(probe.tensors(), probe.metadata())
        if store.put_bytes_if_absent(key, data):
            return probe  # written here: the store's record lists it
        if _compare(store, key, probe) != "same":
            raise ExtractionError(
                f"{store.url_of(key)} was written by another extract step and differs from "
                f"this step's probe; rerun "
                f"`{stage_registry.EXTRACT.command(run_id, store.url)} --force`"
            )
    if isinstance(store, RecordingStore):
        store.keep(key)
    return probe


def _compare(store: Store, key: str, probe: Probe) -> Literal["same", "absent", "differs"]:
    """ "same" when `key` holds `probe`'s tensors and metadata, "absent" when nothing is
    there, "differs" otherwise (unreadable included). Contents, not bytes: safetensors
    writes metadata in a per-process order, so equal probes differ in bytes. "absent" is
    told apart from "differs" from the read itself, never by a second look: a probe another
    step creates in between is not a damaged one to delete."""
    try:
        tensors, metadata = store.get_tensors(key)
    except ArtifactNotFound:
        return "absent"
    except DriftlabError:
        return "differs"
    want = probe.tensors()
    same = (
        metadata == probe.metadata()
        and tensors.keys() == want.keys()
        and all(torch.equal(tensors[name], want[name]) for name in want)
    )
    return "same" if same else "differs"


def build_probe(spec: RunSpec, task: Task, tokenizer: Tokenizer) -> Probe:
    ext = spec.extract
    if ext.token_policy == "answer" and not task.has_answers:
        raise ExtractionError(
            f"extract.token_policy answer needs a task with answers; {task.name} is plain "
            "text: use all, last or random_k"
        )
    if ext.probe_samples > len(task.eval):
        raise ExtractionError(
            f"extract.probe_samples is {ext.probe_samples} but the eval split of "
            f"{task.name} has {len(task.eval)} examples; lower extract.probe_samples "
            "or raise data.eval_samples"
        )
    rng = random.Random(f"probe:{ext.seed}")
    chosen = sorted(rng.sample(range(len(task.eval)), ext.probe_samples))
    examples = [task.eval[i] for i in chosen]
    ids = tokenize_examples(examples, tokenizer, spec.data.max_length)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    examples = [examples[i] for i in order]
    ids = [ids[i] for i in order]
    prompts = answer_starts(examples, ids, tokenizer) if task.has_answers else [0] * len(ids)

    samples, positions = _kept_positions(ids, prompts, ext.token_policy, ext.random_k, rng)
    if ext.max_tokens_per_layer is not None and len(samples) > ext.max_tokens_per_layer:
        keep = sorted(rng.sample(range(len(samples)), ext.max_tokens_per_layer))
        samples = [samples[i] for i in keep]
        positions = [positions[i] for i in keep]
    if not samples:
        raise ExtractionError(
            f"extract.token_policy {ext.token_policy} keeps no token of the probe set "
            f"(every answer cut by data.max_length {spec.data.max_length}?)"
        )

    lengths = torch.tensor([len(seq) for seq in ids], dtype=torch.int64)
    input_ids = torch.full((len(ids), int(lengths.max())), tokenizer.pad_id, dtype=torch.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    sample_t = torch.tensor(samples, dtype=torch.int64)
    position_t = torch.tensor(positions, dtype=torch.int64)
    prompt_t = torch.tensor(prompts, dtype=torch.int64)[sample_t]
    if task.has_answers:
        role = torch.where(position_t < prompt_t, hidden.ROLE_QUESTION, hidden.ROLE_ANSWER)
    else:
        role = torch.full_like(position_t, hidden.ROLE_TEXT)
    return Probe(
        input_ids=input_ids,
        lengths=lengths,
        token_sample=sample_t,
        token_position=position_t,
        token_id=input_ids[sample_t, position_t],
        token_role=role.to(torch.int8),
        example_ids=[ex.id for ex in examples],
        pad_id=tokenizer.pad_id,
        meta={
            "digest": probe_digest(spec),
            "dataset": task.name,
            "token_policy": ext.token_policy,
            "tokenizer": spec.data.tokenizer,
        },
    )


def _kept_positions(
    ids: Sequence[Sequence[int]],
    prompts: Sequence[int],
    policy: str,
    k: int,
    rng: random.Random,
) -> tuple[list[int], list[int]]:
    """(sample, position) of every kept token, in probe order; never a padding position."""
    samples: list[int] = []
    positions: list[int] = []
    for sample, (seq, prompt) in enumerate(zip(ids, prompts, strict=True)):
        kept: Sequence[int]
        if policy == "all":
            kept = range(len(seq))
        elif policy == "last":
            kept = range(len(seq) - 1, len(seq))
        elif policy == "answer":
            kept = range(prompt, len(seq))
        else:  # random_k
            kept = sorted(rng.sample(range(len(seq)), min(k, len(seq))))
        samples.extend([sample] * len(kept))
        positions.extend(kept)
    return samples, positions
