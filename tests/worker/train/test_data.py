"""The fine-tuning data: packing and padding, a deterministic per-epoch order read from any position
(so a resumed run continues exactly), replicas taking disjoint slices, and errors naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from conveyor.train.data import DataOrder, DatasetError, read_samples


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packing_joins_documents_with_eos_and_drops_the_tail(tmp_path):
    data = write(tmp_path / "d.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}, {"input_ids": [10]}])
    samples = read_samples(data, 4, packing=True, eos_id=2)
    assert samples.inputs.tolist() == [[5, 6, 7, 2], [8, 9, 2, 10]]
    assert torch.equal(samples.labels, samples.inputs)


def test_unpacked_samples_are_padded_and_padding_is_not_a_label(tmp_path):
    data = write(tmp_path / "d.jsonl", [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [8, 9]}])
    samples = read_samples(data, 4, packing=False, pad_id=0)
    assert samples.inputs.tolist() == [[5, 6, 7, 8], [8, 9, 0, 0]]
    assert samples.labels.tolist() == [[5, 6, 7, 8], [8, 9, -100, -100]]


def test_text_is_tokenized_with_the_model_tokenizer(tmp_path):
    from conveyor.testing.tiny import build_tokenizer

    tok = build_tokenizer()
    data = write(tmp_path / "d.jsonl", [{"text": "the quick brown fox"}])
    samples = read_samples(data, 2, packing=True, tokenizer=tok, eos_id=2)
    expected = tok("the quick brown fox")["input_ids"] + [2]
    assert samples.inputs.flatten().tolist() == expected[: len(expected) // 2 * 2]


def test_order_is_a_seeded_permutation_per_epoch_read_from_any_position(tmp_path):
    data = write(tmp_path / "d.jsonl", [{"input_ids": [10 + i, 3]} for i in range(10)])
    samples = read_samples(data, 2, packing=False)
    order = DataOrder(samples, seed=4, global_batch=4, replicas=2, micro_batch=1)
    stream = order.indices(0, 30)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new shuffle each epoch
    again = DataOrder(samples, seed=4, global_batch=4, replicas=2, micro_batch=1)
    assert again.indices(17, 5) == stream[17:22]  # a resumed run reads the same stream
    assert DataOrder(samples, seed=5, global_batch=4, replicas=2, micro_batch=1).indices(0, 10) != stream[:10]
    r0, r1 = order.micro_batches(8, 0), order.micro_batches(8, 1)
    firsts = [int(x[0, 0]) - 10 for x, _ in r0 + r1]
    assert firsts == stream[8:12]


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"prompt": "x"}], "line 1: expected an object with text or input_ids"),
        ([{"input_ids": [1, -2]}], "line 1: input_ids must be token ids"),
        ([{"text": "hello"}], "has no tokenizer"),
        (
            [{"input_ids": [1, 2]}, {"input_ids": [1, 400]}],
            "line 2: token id 400 is outside the model's vocabulary",
        ),
        ([{"input_ids": [1, True, 3]}], "line 1: input_ids must be token ids"),  # JSON true is no token
        ([{"input_ids": [1]}], "fewer than one sequence of seqLength"),
    ],
)
def test_bad_data_is_refused_naming_the_field(tmp_path, rows, match):
    data = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DatasetError, match=match) as err:
        read_samples(data, 8, packing=True, vocab_size=320)
    assert str(err.value).startswith("spec.train.dataset")


def test_missing_file_and_bad_json_name_the_field(tmp_path):
    with pytest.raises(DatasetError, match="spec.train.dataset: .* does not exist"):
        read_samples(tmp_path / "none.jsonl", 4, packing=True)
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1]}\nnot json\n')
    with pytest.raises(DatasetError, match="line 2 is not JSON"):
        read_samples(tmp_path / "bad.jsonl", 4, packing=True)
    # Latin-1 bytes: a UnicodeDecodeError out of the file iterator was a crash, restarted three times
    (tmp_path / "latin.jsonl").write_bytes(b'{"input_ids": [1, 2]}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        DatasetError, match="spec.train.dataset: .* line 2 is not UTF-8 .*save the file as UTF-8"
    ):
        read_samples(tmp_path / "latin.jsonl", 4, packing=True)


@pytest.mark.parametrize("ids", [[], [7]])
def test_unpacked_document_without_a_label_is_refused_naming_the_line(tmp_path, ids):
    # one sample a document: with fewer than 2 tokens it has no label, and a micro-batch of such samples
    # had a NaN loss that the run trained on to the end and reported as success
    data = write(tmp_path / "d.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": ids}])
    with pytest.raises(DatasetError, match="line 2 has .* token.*packing false .* at least 2"):
        read_samples(data, 4, packing=False, vocab_size=320)
    assert (
        len(read_samples(data, 4, packing=True, eos_id=2, vocab_size=320)) == 1
    )  # packed, it joins the rest
