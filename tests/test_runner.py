"""The batch scheduler of `sijax experiment` and `sijax evaluate`
(sijax.experiments.runner) on toy batch functions: no model, no JAX work."""

import dataclasses
import json
import os
import re

import pytest

from sijax.errors import InputError
from sijax.experiments.files import read_records
from sijax.experiments.runner import EveryIndex, Runner


@dataclasses.dataclass
class Square:
    """A picklable batch function with state (as a worker's models would be): one
    record per index, and the pieces of a pretend search reported on the way."""

    offset: int = 0

    def __call__(self, group, indices, report=None):
        if report is not None:
            report(10, 0.0, 1.0, 0.0, 1.0)  # one progress report of 10 pieces
        return [
            {"group": group.key, "index": i, "value": i * i + self.offset}
            for i in indices
        ]


@dataclasses.dataclass
class StartsAPool:
    """A batch function that starts a worker pool of its own (as a test with
    processes=N does) and runs its batch there."""

    def __call__(self, group, indices, report=None):
        from sijax.experiments.pool import worker_pool

        with worker_pool(2, Square()) as pool:
            from sijax.experiments.pool import call

            return pool.submit(call, group, indices).result()


class Interrupted(Exception):
    pass


def _run(out, fn, groups=None, **kw):
    kw = {"batch": 3, "records_file": "images.jsonl", "progress": False, **kw}
    return Runner(groups or [EveryIndex("images", 10)], fn, str(out), **kw).run()


def _file(out):
    return read_records(os.path.join(str(out), "images.jsonl"))


def test_every_index_once_completes_and_summarises(tmp_path):
    summaries = []
    records = _run(tmp_path, Square(), summary=summaries.append)
    assert [r["index"] for r in records] == list(range(10))
    assert [r["value"] for r in records] == [i * i for i in range(10)]
    assert _file(tmp_path) == records  # written as they finished
    assert summaries == [records]  # at the end (summary_every not reached)
    # a finished run resumed runs nothing, and still summarises
    calls = []

    def spy(group, indices, report):
        calls.append(indices)
        return Square()(group, indices)

    assert _run(tmp_path, spy, resume=True, summary=summaries.append) == records
    assert calls == [] and len(summaries) == 2
    # `summary_every`: also after the batches (here every one: always due)
    sizes = []
    _run(tmp_path / "periodic", Square(), summary=lambda r: sizes.append(len(r)),
         summary_every=-1.0)  # fmt: skip
    assert sizes == [3, 6, 9, 10, 10]
    # workers need a batch function they can unpickle
    with pytest.raises(InputError, match="picklable"):
        _run(tmp_path / "local", spy, workers=2)


def test_resume_after_an_interruption_redoes_and_loses_nothing(tmp_path):
    calls = []

    def dies_at_7(group, indices, report):
        calls.append(list(indices))
        if 7 in indices:
            raise Interrupted
        return Square()(group, indices)

    with pytest.raises(Interrupted):
        _run(tmp_path, dies_at_7)
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [r["index"] for r in _file(tmp_path)] == list(range(6))
    # a killed writer may leave a torn line: ignored, and cut off by the next append
    # (the file stays strict JSON lines for other readers)
    with open(os.path.join(tmp_path, "images.jsonl"), "a") as f:
        f.write('{"group": "ima')
    with pytest.raises(InputError, match="--resume"):
        _run(tmp_path, Square())
    calls.clear()

    def spy(group, indices, report):
        calls.append(list(indices))
        return Square()(group, indices)

    records = _run(tmp_path, spy, resume=True)
    assert calls == [[6, 7, 8], [9]]  # nothing that finished runs again
    assert [r["index"] for r in _file(tmp_path)] == list(range(10))
    assert [r["index"] for r in records] == list(range(10))
    with open(os.path.join(tmp_path, "images.jsonl")) as f:
        assert [json.loads(line)["index"] for line in f] == list(range(10))


def test_groups_take_turns_batch_by_batch(tmp_path):
    """Several groups (records name theirs in `key_field`) alternate, so that a
    partial run (`max_batches`) has some of each; the bar counts every group."""
    groups = [EveryIndex("a", 4), EveryIndex("b", 7)]
    shown = []

    def postfix(group, records):
        shown.append(group.key)
        return f"{group.key}: {len(records)} records"

    order = [
        (r["group"], r["index"])
        for r in _run(tmp_path / "partial", Square(), groups, key_field="group",
                      max_batches=3)
    ]  # fmt: skip
    assert order == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2),
                     ("a", 3)]  # fmt: skip
    records = _run(tmp_path / "full", Square(), groups, key_field="group",
                   progress=True, postfix=postfix)  # fmt: skip
    assert [r["group"] for r in records] == list("aaabbbabbbb")
    assert shown == ["a", "b", "a", "b", "b"]
    with pytest.raises(InputError, match="key_field"):
        Runner(groups, Square(), str(tmp_path), batch=3)


def test_a_second_writer_is_refused(tmp_path):
    """The output directory's lock: a run started while another writes it fails at
    once, naming the holder; the first run is unharmed."""
    refused = []

    def starts_a_second_run(group, indices, report):
        with pytest.raises(InputError) as e:
            _run(tmp_path, Square(), resume=True, what="sijax evaluate")
        refused.append(str(e.value))
        return Square()(group, indices)

    _run(tmp_path, starts_a_second_run)
    assert len(refused) == 4
    assert re.search(r"another sijax evaluate \(pid \d+ on .*\)", refused[0])
    assert [r["index"] for r in _file(tmp_path)] == list(range(10))


def test_worker_processes_give_the_records_of_one_process(tmp_path, capsys):
    """workers=2: the batch function is pickled once into each spawned worker (its
    state with it); the records are those of one process, each index once (batches
    may finish in any order), and the workers' progress reports reach the bar."""
    one = _run(tmp_path / "one", Square(offset=5))
    capsys.readouterr()
    two = _run(tmp_path / "two", Square(offset=5), workers=2, progress=True)
    assert "batch: 10 pieces" in capsys.readouterr().err
    assert sorted(two, key=lambda r: r["index"]) == one
    assert sorted(json.dumps(r) for r in _file(tmp_path / "two")) == sorted(
        json.dumps(r) for r in one
    )


def test_a_torn_tail_longer_than_a_block_is_cut_whole(tmp_path):
    from sijax.experiments.files import _drop_torn_tail, append_records

    path = str(tmp_path / "r.jsonl")
    append_records(path, [{"i": 0}])
    with open(path, "a") as f:
        f.write('{"i": 1, "x": "' + "y" * 300)
    _drop_torn_tail(path, block=64)
    with open(path) as f:
        assert f.read() == '{"i": 0}\n'
    with open(path, "w") as f:
        f.write('{"torn')  # nothing intact at all
    append_records(path, [{"i": 2}])
    assert read_records(path) == [{"i": 2}]
    with open(path) as f:
        assert f.read() == '{"i": 2}\n'


def test_a_last_record_without_its_newline_is_kept(tmp_path):
    """A writer killed between a record and its newline leaves a whole record:
    read_records reads it (so a resume does not redo it), and the next append
    must end its line rather than cut it off as torn (it was lost from the file,
    and the file no longer held every record the run had counted)."""
    from sijax.experiments.files import append_records

    path = str(tmp_path / "r.jsonl")
    with open(path, "w") as f:
        f.write('{"index": 0}\n{"index": 1}')
    assert [r["index"] for r in read_records(path)] == [0, 1]
    append_records(path, [{"index": 2}])
    with open(path) as f:
        assert f.read() == '{"index": 0}\n{"index": 1}\n{"index": 2}\n'
    # through the Runner: index 1 is not run again, and stays in the file
    with open(path, "w") as f:
        f.write('{"group": "images", "index": 0, "value": 0}\n'
                '{"group": "images", "index": 1, "value": 1}')
    os.rename(path, tmp_path / "images.jsonl")
    calls = []

    def spy(group, indices, report):
        calls.append(list(indices))
        return Square()(group, indices)

    _run(tmp_path, spy, resume=True)
    assert calls == [[2, 3, 4], [5, 6, 7], [8, 9]]
    assert [r["index"] for r in _file(tmp_path)] == list(range(10))


def test_a_pool_inside_a_worker_is_refused_not_hung(tmp_path):
    """workers=2 whose batches start pools of their own (sijax test --tiles
    --workers 2 --processes 2, or evaluate --workers 2 --set processes=2: each
    test shares its line over a pool that ``line_workers`` keeps open) hung once
    every record was written, the worker unable to exit past its own pool; the
    nested pool is refused with a clear error, and a pool started in the run's own
    process still works."""
    with pytest.raises(InputError, match="cannot start worker processes of its own"):
        _run(tmp_path / "nested", StartsAPool(), workers=2)
    assert [r["index"] for r in _run(tmp_path / "one", StartsAPool())] == list(
        range(10))
