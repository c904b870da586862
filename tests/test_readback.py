"""Reading a recorded run back by meter and time (:mod:`smartmeter_ophyd.readback`).

Every answer is checked against the stream as the catalog serves it whole, and the number of
HTTP requests each helper makes is counted: every request to a Tiled server costs tens of
milliseconds (tens of ms in-process for the embedded catalog, plus the network for a
remote one), and the CLI's summary and plots read a run through these helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smartmeter_ophyd.plotting import plot_run
from smartmeter_ophyd.readback import (
    SYNCED_SOURCE,
    UNSYNCED_SOURCE,
    ReadbackError,
    axis_source,
    first_last_time,
    meter_data,
    meter_rows,
    power_summary,
    run_meters,
    time_source,
)
from smartmeter_ophyd.storage import read_event_table, time_span

pytestmark = pytest.mark.slow
METERS = ("exp1", "exp2")


class Requests:
    """Counts the requests a tiled client sends while it is in use."""

    def __init__(self, run: Any) -> None:
        self.hooks = run.context.http_client.event_hooks["request"]
        self.sent: list[str] = []

    def __call__(self, request: Any) -> None:
        self.sent.append(f"{request.method} {request.url.path}")

    def __enter__(self) -> Requests:
        self.hooks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.remove(self)


@pytest.fixture()
def run(recorded_run: Any, embedded_catalog: Any) -> Any:
    """The recorded run, fetched afresh: nothing kept from an earlier test."""
    return embedded_catalog.client[recorded_run.start["uid"]]


_TIMES: dict[tuple[str, str], np.ndarray] = {}


def whole_times(run: Any, meter: str) -> np.ndarray:
    """``meter``'s time array as Tiled serves it whole (read once per run)."""
    key = (run.start["uid"], meter)
    if key not in _TIMES:
        _TIMES[key] = np.asarray(run[meter][f"{meter}_time"].read())
    return _TIMES[key]


def test_run_meters_lists_the_meters_in_one_request(run: Any) -> None:
    with Requests(run) as requests:
        assert run_meters(run) == list(METERS)
    assert len(requests.sent) == 1, requests.sent


@pytest.mark.parametrize("meter", METERS)
def test_first_last_time_is_the_streams_ends_in_one_request(run: Any, meter: str) -> None:
    times = whole_times(run, meter)
    with Requests(run) as requests:
        span = first_last_time(run, meter)
    assert span == (times[0], times[-1])
    assert len(requests.sent) == 1, requests.sent  # the search; the rows come from the file
    assert time_source(run, meter).startswith("meter clock")


def test_a_closed_runs_streams_are_asked_once(run: Any, recorded_run: Any) -> None:
    assert run.metadata["stop"]
    with Requests(run) as requests:
        first = [first_last_time(run, meter) for meter in METERS]
        again = [first_last_time(run, meter) for meter in METERS]
        meter_data(run, "exp1", *first[0], channels=["i_l3"])
    assert again == first
    assert len(requests.sent) == len(METERS), requests.sent
    stream = run["exp1"]  # a stream container, not a run: asked every time
    with Requests(run) as requests:
        assert time_span(stream, None, prefix="exp1") == time_span(stream, None, prefix="exp1")
    assert len(requests.sent) == 2, requests.sent


def test_time_span_over_http_reads_the_two_rows_only(run: Any) -> None:
    times = whole_times(run, "exp2")
    with Requests(run) as requests:
        span = time_span(run, "exp2", prefix="exp2", access="http")
    assert span == (times[0], times[-1])
    assert len(requests.sent) == 3, requests.sent
    assert sum("/array/full/" in r for r in requests.sent) == 2


def test_a_stream_without_the_time_key_has_no_span(run: Any) -> None:
    assert time_span(run, "exp1", prefix="exp2") is None


def test_an_unknown_meter_is_an_error_naming_the_runs_meters(run: Any) -> None:
    for read in (lambda: first_last_time(run, "exp3"), lambda: meter_data(run, "exp3"),
                 lambda: meter_data(run, "exp3", 0.0, 1e10, channels=["v_l1"])):
        with pytest.raises(ReadbackError, match=r"no stream for meter 'exp3'.*exp1.*exp2"):
            read()


def test_a_window_of_meter_data_reads_in_one_request(run: Any) -> None:
    times = whole_times(run, "exp1")
    t0, t1 = times[100], times[900]
    with Requests(run) as requests:
        ds = meter_data(run, "exp1", t0, t1, channels=["v_l1"])
    assert np.array_equal(ds["time"].values, times[100:900])
    assert len(requests.sent) == 1, requests.sent


def test_power_summary_counts_every_sample_of_the_meter(run: Any) -> None:
    summary = power_summary(run, "exp2")
    assert int(summary["samples"].sum()) == whole_times(run, "exp2").shape[0]
    assert summary.attrs["time_source"].startswith("meter clock")


def test_the_plots_read_each_meter_in_a_few_requests(run: Any, tmp_path: Path) -> None:
    with Requests(run) as requests:
        pngs = plot_run(run, tmp_path)
    assert all(p.stat().st_size > 10_000 for p in pngs)
    # per meter its stream's search, asked once; the run's listing once per plot
    assert len(requests.sent) == len(METERS) + 2, requests.sent


@pytest.mark.parametrize("stream", ["meter_summary", "synchronization", "alignment"])
def test_a_per_run_table_reads_in_two_requests_as_databroker_reads_it(run: Any,
                                                                     stream: str) -> None:
    expected = run[stream].read()
    with Requests(run) as requests:
        table = read_event_table(run, stream)
    assert len(requests.sent) == 2, requests.sent
    assert len(table) == expected.sizes["time"] > 0
    for key in expected.data_vars:
        np.testing.assert_array_equal(np.asarray(table[key]), np.asarray(expected[key]),
                                      err_msg=str(key))
    if "meter" in table:
        assert meter_rows(table).keys() == set(METERS)


def test_a_missing_table_is_a_key_error(run: Any) -> None:
    with pytest.raises(KeyError, match="no stream 'nope'"):
        read_event_table(run, "nope")


def test_an_axis_counted_from_zero_is_not_called_unix_time() -> None:
    assert axis_source(12.5) == UNSYNCED_SOURCE  # a meter without NTP time (§6.1)
    assert axis_source(999_999_999.0) == UNSYNCED_SOURCE
    assert axis_source(1_796_300_386.0) == SYNCED_SOURCE
    assert axis_source(None) == SYNCED_SOURCE
