"""GET /keys/{key}: a key's partition, step count, last offset and event time, model version and last
prediction; 404 for a key this daemon does not hold, 503 while a partition it may be in restores; h and c
only with http.expose_state; nothing changed by asking."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import quote

import numpy as np
import torch

from conftest import event_value, http_get, produce
from streamlstm.serving.queries import MAX_WAITING, Holding, KeyQueries, describe
from streamlstm.state.resident import ResidentKeys
from streamlstm.state.store import LocalStores, StoreMeta
from streamlstm.state.table import StateTable
from test_durable_state import predictions_by_source, prepare

CPU = torch.device("cpu")


def holding(tmp_path, limit: int = 0, restoring: tuple[int, ...] = (), expose: bool = False,
            dtype: str = "float32") -> Holding:
    table = StateTable(2, 4, CPU, dtype=dtype)
    table.keep_outputs(1)
    stores = LocalStores(tmp_path / "stores", "changelog")
    for partition in (0, 1):
        stores.establish(partition, [], StoreMeta(stores.owner, 2, 4, "v1", 0, 0), True)
    resident = ResidentKeys(table, stores, limit, (2, 4, None), "v1")
    rows = table.rows([(1, "a"), (0, "b"), (1, "c")])
    table.scatter(rows, torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    table.stamp(rows.numpy(), np.array([7, 8, 9]), np.array([70, 80, 90]))
    table.set_outputs(rows.numpy(), np.array([[1.5], [2.5], [3.5]], np.float32))
    return Holding(table, resident, [0, 1], list(restoring), "v1", expose)


def answer(at: Holding, name: str) -> tuple[int, dict]:
    status, content_type, body = describe(name, at)
    assert content_type == "application/json"
    return status, json.loads(body)


def test_a_resident_key_is_described_and_asking_changes_nothing(tmp_path):
    at = holding(tmp_path)
    before = (at.table.steps.clone(), at.table.offsets.copy(), at.table.used.copy())
    status, body = answer(at, "a")
    assert status == 200 and body == {"key": "a", "partition": 1, "resident": True, "steps": 1, "offset": 7,
                                      "time": 70, "model_version": "v1", "prediction": [1.5]}
    assert torch.equal(before[0], at.table.steps) and np.array_equal(before[1], at.table.offsets)
    assert np.array_equal(before[2], at.table.used), "a query is not a use: it must not keep a key resident"
    changes = at.table.take_changes()
    assert len(changes.changed.keys) == 3  # the three stepped, nothing more


def test_an_unknown_key_is_404_and_503_while_a_partition_restores(tmp_path):
    assert answer(holding(tmp_path / "1"), "zzz")[0] == 404
    status, body = answer(holding(tmp_path / "2", restoring=(1,)), "zzz")
    assert status == 503 and body["restoring"] == [1] and "restoring" in body["error"]
    assert answer(holding(tmp_path / "3", restoring=(1,)), "b")[0] == 200, "a key held answers all the same"


def test_h_and_c_only_with_expose_state(tmp_path):
    assert "h" not in answer(holding(tmp_path / "1"), "a")[1]
    at = holding(tmp_path / "2", expose=True, dtype="bfloat16")
    body = answer(at, "c")[1]
    h, c = at.table.gather(torch.tensor([at.table.row((1, "c"))]))
    assert np.array_equal(np.array(body["h"]), h[:, 0].numpy()) and np.array_equal(np.array(body["c"]), c[:, 0].numpy())


def test_a_key_evicted_to_its_local_store_is_described_from_there(tmp_path):
    at = holding(tmp_path, limit=2)
    at.resident.evict(1)  # the least recently used: "a", "b" and "c" were used together; one of them goes
    gone = next(name for name in ("a", "b", "c") if at.table.row((0 if name == "b" else 1, name)) is None)
    status, body = answer(at, gone)
    assert status == 200 and body["resident"] is False and body["steps"] == 1 and body["prediction"] is None
    assert body["offset"] == {"a": 7, "b": 8, "c": 9}[gone] and body["model_version"] == "v1"


def test_the_mailbox_answers_from_the_loop_and_times_out_without_it(tmp_path):
    queries, at = KeyQueries(), holding(tmp_path)
    status, _, body = queries.ask("a")  # nobody answers: 503 after the timeout
    assert status == 503 and b"did not answer" in body
    result: list = []
    asker = threading.Thread(target=lambda: result.append(queries.ask("a")))
    asker.start()
    while not result:
        queries.answer_all(lambda: at)
    asker.join()
    assert result[0][0] == 200


def test_queries_beyond_the_waiting_limit_are_refused_so_probes_keep_their_threads(tmp_path):
    queries = KeyQueries()
    waiting = [threading.Thread(target=queries.ask, args=("a",)) for _ in range(MAX_WAITING)]
    for thread in waiting:
        thread.start()
    while queries._waiting.qsize() < MAX_WAITING:  # both are in the mailbox, holding their slots
        time.sleep(0.001)
    status, _, body = queries.ask("b")
    assert status == 503 and b"waiting already" in body
    at = holding(tmp_path)
    queries.answer_all(lambda: at)
    for thread in waiting:
        thread.join()


def test_a_daemon_answers_for_its_keys_over_http(broker, daemon_factory):
    daemon = daemon_factory()
    prepare(daemon)
    daemon.start()
    events = [("meter 1/a", [1.0, 2.0, 3.0]), ("k2", [1.0, 2.0, 4.0]), ("meter 1/a", [2.0, 2.0, 5.0])]
    produce(broker, daemon.topic, [(k.encode(), event_value(f, 1_700_000_000_000 + i)) for i, (k, f) in enumerate(events)])
    found = predictions_by_source(broker, daemon.kafka["output_topic"], len(events))
    last = found[1_700_000_000_002][0]
    status, text = http_get(daemon.port, "/keys/" + quote("meter 1/a", safe=""))
    assert status == 200, text
    body = json.loads(text)
    assert (body["key"], body["steps"], body["resident"]) == ("meter 1/a", 2, True)
    assert abs(body["time"] - time.time() * 1000) < 120_000  # the TTL clock's: processing time by default
    assert body["partition"] == last["source"]["partition"] and body["offset"] == last["source"]["offset"]
    assert body["prediction"] == last["prediction"] and body["model_version"] == last["model_version"]
    assert "h" not in body
    assert http_get(daemon.port, "/keys/nobody")[0] == 404
    assert daemon.stop() == 0
