"""A meter's reply to ``stop`` is judged the same over TCP and MQTT (§4.8, §8.2).

The firmware refuses a stop in one way only: ``{"error":true,"cmd":"stop"}`` when it is not
sampling (§4.8, §12 #3), e.g. after another connection stopped it.  That ends the session
as "stopped elsewhere" with a warning naming the meter, on both transports.  Any other
failed stop reply is not firmware's; it is refused with ``MeterCommandRejected`` naming the
meter and quoting its message (the MQTT session used to return it as a stop).

* the judge, with the verbatim lines of protocol.md §4.8 through the codec's connection;
* over real MQTT (mosquitto of services.env) against the emulator: a session stopped from a
  TCP connection, then stopped over MQTT, gets the firmware's idle refusal;
* over real MQTT against a scripted ESP32 (an MQTT client playing the meter): a failed stop
  reply with a message raises, naming the meter and the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

import pytest

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    AsyncMqttBroker,
    MeterCommandRejected,
    MeterProtocolError,
)
from smartmeter_ophyd.client._mqtt._messages import expected_sample_reply, info_topic, meter_topic
from smartmeter_ophyd.client._stop_reply import judge_stop_reply
from smartmeter_ophyd.emulator import EmulatedMeter
from smartmeter_ophyd.protocol import Answered, MeterConnection, Reply, Sample, Stop, StopReply
from tests.mqtt_tools import Probe

from .client_fakes import MeterStarter, unique

STOP_LINE = (
    b'Info:{"msg":"Received stop command","sample_duration":16157,"samples":16,'
    b'"sent_samples":16,"start_ts":"1614697441.119","stop_ts":"1614697457.276",'
    b'"ip":"192.168.0.138","avg_rate":0.955618,"cmd":"stop","error":false}\r\n'
)
"""protocol.md §4.8, verbatim."""
IDLE_STOP_LINE = b'Info:{"error":true,"cmd":"stop"}\r\n'
"""protocol.md §4.8: ``stop`` while idle (also during a scheduled countdown)."""
FAILED_STOP = {"msg": "Stop failed: sink busy", "samples": 3, "cmd": "stop", "error": True}
"""Not a reply the firmware sends (a broken or hostile peer): a failed stop with counts."""

LABEL = "meter smartmeterX (192.168.0.138:54321)"


def stop_reply_of(line: bytes) -> Reply:
    """What the codec's connection makes of ``line`` as the answer to a ``stop`` it sent."""
    connection = MeterConnection()
    request = connection.send(Stop())
    connection.receive_data(line)
    (event,) = [e for e in connection.events() if isinstance(e, Answered)]
    assert event.request is request and isinstance(event.reply, Reply)
    return event.reply


def test_a_stop_reply_with_counts_is_the_stop(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        view = judge_stop_reply(LABEL, stop_reply_of(STOP_LINE))
    assert isinstance(view, StopReply) and view.succeeded and not view.was_idle
    assert (view.samples, view.sent_samples) == (16, 16)
    assert not caplog.records


def test_the_firmware_refusing_a_stop_while_idle_is_logged_not_raised(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        view = judge_stop_reply(LABEL, stop_reply_of(IDLE_STOP_LINE))
    assert view.was_idle and not view.succeeded
    (record,) = caplog.records
    assert record.getMessage() == (f"{LABEL}: stop: the meter says it was not sampling "
                                   "(session already ended)")


def test_any_other_failed_stop_reply_is_rejected_naming_the_meter_and_message() -> None:
    line = b"Info:" + json.dumps(FAILED_STOP, separators=(",", ":")).encode() + b"\r\n"
    with pytest.raises(MeterCommandRejected) as info:
        judge_stop_reply(LABEL, stop_reply_of(line))
    assert str(info.value) == f"{LABEL}: 'stop' rejected by the firmware: 'Stop failed: sink busy'"
    assert info.value.meter == LABEL and info.value.reply == FAILED_STOP
    other = Reply({"msg": "Current log level: 2", "cmd": "log", "error": False}, "{...}")
    with pytest.raises(MeterProtocolError,
                       match=rf"^{re.escape(LABEL)}: reply to 'stop': .*names 'log'"):
        judge_stop_reply(LABEL, other)


# ------------------------------------------------------------------ over real MQTT


@pytest.fixture
async def mqtt_meter(start_meter: MeterStarter) -> EmulatedMeter:
    """An emulated meter on the shared mosquitto, NTP-synced to a local responder."""
    return await start_meter("st")


@pytest.mark.service
async def test_mqtt_stop_of_a_meter_stopped_elsewhere_ends_the_session(
    mqtt_meter: EmulatedMeter, broker: AsyncMqttBroker, caplog
) -> None:
    m = broker.meter(mqtt_meter.name)
    session = await m.sample(rate=10, measures="v,i_RMS")
    async with AsyncMeterClient("127.0.0.1", mqtt_meter.command_port, timeout=3.0) as other:
        stopped = await other.stop()  # stop works from any connection (§4.8)
    assert stopped.succeeded and stopped.sent_samples is not None
    with caplog.at_level(logging.WARNING, logger="smartmeter_ophyd.client"):
        summary = await session.stop()
    assert not session.active
    assert summary.ended_by == "stopped elsewhere" and summary.device_sent_samples is None
    assert [r.getMessage() for r in caplog.records if "stop:" in r.getMessage()] == [
        f"{m.meter_label}: stop: the meter says it was not sampling (session already ended)"]


@pytest.mark.service
async def test_mqtt_failed_stop_reply_is_rejected_naming_the_meter(
    mqtt_broker: tuple[str, int], broker: AsyncMqttBroker
) -> None:
    name = unique("stf")
    m = broker.meter(name)
    command = Sample(transport="MQTT", rate=5, measures="v,i_RMS")
    reply: dict[str, Any] = json.loads(expected_sample_reply(command, name))
    reply["startTs"] = f"{time.time():.3f}"
    async with Probe(*mqtt_broker, topic=meter_topic(name, "cmd")) as esp32:
        starting = asyncio.ensure_future(m.sample(command))
        await esp32.wait(lambda msg: json.loads(msg.payload)["cmd"] == "sample")
        await esp32.publish(info_topic(name), json.dumps(reply, separators=(",", ":")))
        session = await starting
        stopping = asyncio.ensure_future(session.stop())
        await esp32.wait(lambda msg: json.loads(msg.payload)["cmd"] == "stop")
        await esp32.publish(info_topic(name), json.dumps(FAILED_STOP, separators=(",", ":")))
        with pytest.raises(MeterCommandRejected) as info:
            await stopping
    assert str(info.value) == (f"{m.meter_label}: 'stop' rejected by the firmware: "
                               "'Stop failed: sink busy'")
    assert session.active  # not taken for a stop: the meter's state is unknown
