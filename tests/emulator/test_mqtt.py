"""The emulator's MQTT (protocol.md §8, §4.14, §3.3) against a real mosquitto.

A probe (aiomqtt, not the library's client) watches ``powermeter/#``; the meter's TCP
command connection shows the log lines the firmware prints.  Values are checked against the
emulator's ground truth (grid model, session truth), never against the MQTT code's output.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smartmeter_ophyd.emulator import EmulatedMeter
from tests.mqtt_tools import PrivateBroker, Probe

from .conftest import MeterFactory
from .emulator_wire import RawClient, open_client

pytestmark = pytest.mark.service

JSON_FORMAT_ERROR = 'JSON format error, syntax: {"cmd":<cmdName>, "[payload":{<data>}]}}'


def long_time_s(text: str) -> float:
    """Seconds of a long local time ``MM/DD/YYYY HH:MM:SS.mmm`` (§6.1), for differences."""
    return datetime.strptime(text, "%m/%d/%Y %H:%M:%S.%f").timestamp()


def topics(name: str) -> tuple[str, str]:
    return f"powermeter/{name}/state/info", f"powermeter/{name}/state/sample"


async def connected_meter(make_meter: MeterFactory, broker: tuple[str, int], **kw: Any) -> EmulatedMeter:
    host, port = broker
    meter = await make_meter(mqtt_server=host, mqtt_port=port, **kw)
    deadline = time.monotonic() + 3
    while not meter.mqtt.connected():
        assert time.monotonic() < deadline, "the meter did not connect to the broker"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # SUBACKs
    return meter


async def log_texts(client: RawClient, n: int) -> list[str]:
    """The texts of the next ``n`` log lines (lifeness lines skipped)."""
    out: list[str] = []
    while len(out) < n:
        line = (await client.read_line()).decode()
        assert line.startswith("Info:["), line
        text = line.split(": ", 1)[1] if ": " in line else ""
        if text:
            out.append(text)
    return out


async def logs_until_reply(client: RawClient) -> tuple[list[str], dict[str, Any]]:
    """Log texts (lifeness skipped) up to the next JSON reply, and the reply."""
    texts: list[str] = []
    while True:
        line = (await client.read_line()).decode()
        if line.startswith("Info:{"):
            return texts, json.loads(line[5:])
        text = line.split(": ", 1)[1] if ": " in line else ""
        if text:
            texts.append(text)


async def test_mqtt_server_command_connects_before_replying(make_meter: MeterFactory, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """§3.3/§8.1: the blocking connect logs 'MQTT connected to' and both subscriptions before
    the reply; the meter then answers on its topics with its name as client id."""
    host, port = mqtt_broker
    meter = await make_meter(mqtt_port=port)
    c = await open_client(meter.command_port)
    await c.send({"cmd": "mqttServer", "payload": {"server": host}})
    assert await log_texts(c, 3) == [
        f"MQTT connected to {host}",
        "Subscribing to: powermeter/+",
        f"Subscribing to: powermeter/{meter.name}/+",
    ]
    reply = await c.read_json()
    assert reply == {"error": False, "cmd": "mqttServer", "msg": f"Set MQTTServer address to: {host}",
                     "mqtt_server": host}
    info, _ = topics(meter.name)
    async with Probe(host, port) as probe:
        await probe.publish(f"powermeter/{meter.name}/state", "")
        msg = await probe.wait(lambda m: m.topic == info)
        assert json.loads(msg.text)["sampleState"] == "idle"
        # "-" disables MQTT; the disconnect log names the NEW server (simpleMQTT keeps a
        # pointer to the config buffer, §3.3).
        await c.send({"cmd": "mqttServer", "payload": {"server": "-"}})
        texts, reply = await logs_until_reply(c)
        assert texts[-1] == "MQTT disconnected from -"
        assert reply["mqtt_server"] == "-"
        assert not meter.mqtt.connected()
    await c.close()


async def test_boot_without_broker_logs_an_error(make_meter: MeterFactory) -> None:
    """§8.1: the boot attempt's failure is an ERROR (also for '-', which is never tried)."""
    meter = await make_meter()
    assert meter.stored.log_current[-1].endswith("Cannot connect to MQTT Server -")
    meter2 = await make_meter(mqtt_server="127.0.0.1", mqtt_port=9)
    assert meter2.stored.log_current[-1].endswith("Cannot connect to MQTT Server 127.0.0.1")
    assert not meter2.mqtt.connected()


async def test_status_while_idle_and_on_off_around_a_session(make_meter: MeterFactory, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """§8.2: the idle status (keys, units, rounding, ts) matches the grid; 'on'/'off' frame a
    session and no status is published while sampling (§8.3)."""
    meter = await connected_meter(make_meter, mqtt_broker, mqtt_status_s=0.3)
    info, sample = topics(meter.name)
    async with Probe(*mqtt_broker) as probe:
        msg = await probe.wait(lambda m: m.topic == sample)
        status = json.loads(msg.text)
        assert list(status) == ["power", "energy", "current", "volt", "ts"]
        snap = meter.grid.snapshot(meter.clock.true_now(), meter.config.circuit)
        assert status["power"] == pytest.approx(float(np.sum(snap.active_power[:3])), rel=2e-3, abs=0.02)
        current_a = (float(np.sum(snap.current_rms[:3])) + snap.neutral_current_rms) / 1000
        assert status["current"] == pytest.approx(current_a, rel=2e-3, abs=0.02)
        assert status["volt"] == pytest.approx(float(np.mean(snap.voltage_rms[:3])), abs=0.02)
        for key in ("power", "current", "volt"):
            assert abs(status[key] * 100 - round(status[key] * 100)) < 0.05  # 2 decimals (float32)
        assert status["energy"] == pytest.approx(sum(meter.stored.energy_wh) / 1000, abs=0.01)
        assert abs(int(status["ts"]) - meter.clock.now()) <= 1.5

        c = await open_client(meter.command_port)
        mark = len(probe.messages)
        await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100}})
        await asyncio.sleep(1.0)
        await c.send({"cmd": "stop"})
        await asyncio.sleep(0.3)
        during = [m.text for m in probe.on(sample, mark)]
        on, off = during.index("on"), during.index("off")
        assert off == on + 1, f"a status came while sampling: {during}"
        after = len(probe.messages)
        await probe.wait(lambda m: m.topic == sample and m.text.startswith("{"), since=after)
        await c.close()


async def test_state_and_sample_topics(make_meter: MeterFactory, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """§8.2: 'state' answers idle/sampling; 'sample' answers v, i (mA), q, s, e (kWh, L1 one
    kWh low, §12 #12) and W for anything else, as '%.2f' triples, on …/state/info."""
    meter = await connected_meter(make_meter, mqtt_broker)
    info, _ = topics(meter.name)
    base = f"powermeter/{meter.name}"
    c = await open_client(meter.command_port)
    async with Probe(*mqtt_broker) as probe:
        expected_units = {"v": "V", "i": "mA", "q": "var", "s": "VA", "p": "W", "": "W", "x": "W"}
        fields = {"v": "voltage_rms", "i": "current_rms", "q": "reactive_power",
                  "s": "apparent_power", "p": "active_power", "": "active_power", "x": "active_power"}
        for request, unit in expected_units.items():
            mark = len(probe.messages)
            # The meter reads the grid somewhere between the request and its reply; a load
            # may switch in between (a loaded host stretches it), so either end is the truth.
            asked = meter.clock.true_now()
            await probe.publish(f"{base}/sample", request)
            reply = json.loads((await probe.wait(lambda m: m.topic == info, since=mark)).text)
            answered = meter.clock.true_now()
            assert list(reply) == ["value", "unit", "ts"] and reply["unit"] == unit
            values = [float(v) for v in reply["value"].split(",")]
            assert all(len(v.split(".")[1]) == 2 for v in reply["value"].split(","))
            truths = [[float(t) for t in getattr(meter.grid.snapshot(at, meter.config.circuit),
                                                 fields[request])[:3]]
                      for at in (asked, answered)]
            assert any(values == pytest.approx(truth, rel=2e-3, abs=0.011) for truth in truths), (
                request, values, truths)
        # 'e': stored energy + the ADE's unread energy (read-with-reset, lost from the total).
        meter.stored.energy_wh = [5000.0, 2000.0, 3000.0]
        mark = len(probe.messages)
        await probe.publish(f"{base}/sample", "e")
        reply = json.loads((await probe.wait(lambda m: m.topic == info, since=mark)).text)
        assert reply["unit"] == "kWh"
        assert [float(v) for v in reply["value"].split(",")] == pytest.approx([4.0, 2.0, 3.0], abs=0.011)
        # The firmware logs what came in and what it answered (§8.2).
        texts = await log_texts(c, 3)
        assert texts[0].startswith(f"MQTT msg on topic: {base}/sample: v")
        assert texts[1] == "MQTT wants sample"
        assert texts[2].startswith('{"value":"')

        mark = len(probe.messages)
        await probe.publish(f"{base}/state", "anything")
        state = json.loads((await probe.wait(lambda m: m.topic == info, since=mark)).text)
        assert list(state) == ["sampleState", "ts"] and state["sampleState"] == "idle"
        assert abs(long_time_s(state["ts"]) - long_time_s(meter.long_time())) < 2
        await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 50}})
        mark = len(probe.messages)
        await probe.publish(f"{base}/state", "")
        state = json.loads((await probe.wait(lambda m: m.topic == info, since=mark)).text)
        assert state["sampleState"] == "sampling"
        # Other last levels are ignored (only the last level is examined).
        mark = len(probe.messages)
        await probe.publish(f"{base}/switch", "on")
        await asyncio.sleep(0.3)
        assert probe.on(info, mark) == []
    await c.close()


async def test_commands_over_mqtt_and_broadcast(make_meter: MeterFactory, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """§8.2/§8.3: 'cmd' runs any command and publishes the reply (also logged); powermeter/cmd
    reaches every meter; invalid JSON logs the parser error; 'info' writes the info line to
    the last connection that sent a command and publishes nothing."""
    a = await connected_meter(make_meter, mqtt_broker)
    b = await connected_meter(make_meter, mqtt_broker)
    info_a, _ = topics(a.name)
    info_b, _ = topics(b.name)
    ca = await open_client(a.command_port)
    async with Probe(*mqtt_broker) as probe:
        await probe.publish(f"powermeter/{a.name}/cmd", json.dumps({"cmd": "getVoltage"}))
        reply = json.loads((await probe.wait(lambda m: m.topic == info_a)).text)
        snap = a.grid.snapshot(a.clock.true_now(), a.config.circuit)
        assert reply["error"] is False and reply["cmd"] == "getVoltage" and reply["unit"] == "V"
        assert reply["voltage"] == pytest.approx([float(v) for v in snap.voltage_rms[:3]], rel=2e-3)
        texts = await log_texts(ca, 2)
        assert texts[0] == f'MQTT msg on topic: powermeter/{a.name}/cmd: {{"cmd": "getVoltage"}}'
        assert json.loads(texts[1]) == reply

        mark = len(probe.messages)
        await probe.publish("powermeter/cmd", json.dumps({"cmd": "getPeriod"}))
        ra = json.loads((await probe.wait(lambda m: m.topic == info_a, since=mark)).text)
        rb = json.loads((await probe.wait(lambda m: m.topic == info_b, since=mark)).text)
        assert ra["cmd"] == rb["cmd"] == "getPeriod" and ra["unit"] == "Hz"

        mark = len(probe.messages)
        await probe.publish(f"powermeter/{a.name}/cmd", "{not json")
        reply = json.loads((await probe.wait(lambda m: m.topic == info_a, since=mark)).text)
        assert reply == {"error": True, "msg": JSON_FORMAT_ERROR}
        await ca.wait_line(lambda x: x.startswith(b"Info:[E]")
                           and x.endswith(b": deserializeJson() failed: _not json"))

        # info over MQTT: the reply object is cleared (nothing published); the info line goes
        # to newGetter, the TCP connection that sent the last command.
        await ca.command({"cmd": "getCurrent"})
        mark = len(probe.messages)
        await probe.publish(f"powermeter/{a.name}/cmd", json.dumps({"cmd": "info"}))
        line = await ca.wait_line(lambda x: x.startswith(b'Info:{"cmd":"info"'))
        assert json.loads(line[5:])["name"] == a.name
        await asyncio.sleep(0.2)
        assert probe.on(info_a, mark) == []

        # Busy-checked commands are refused while sampling, over MQTT too (§2.8).
        await ca.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 50}})
        mark = len(probe.messages)
        await probe.publish(f"powermeter/{a.name}/cmd", json.dumps({"cmd": "getPower"}))
        reply = json.loads((await probe.wait(lambda m: m.topic == info_a, since=mark)).text)
        assert reply["state"] == "busy" and reply["error"] is True
    await ca.close()


async def test_packets_over_256_bytes_are_dropped(make_meter: MeterFactory, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """§8.3: PubSubClient's 256-byte buffer: a longer reply is not published (it is still
    logged), and a longer incoming message is ignored without a log line."""
    meter = await connected_meter(make_meter, mqtt_broker)
    info, _ = topics(meter.name)
    base = f"powermeter/{meter.name}"
    c = await open_client(meter.command_port)
    async with Probe(*mqtt_broker) as probe:
        for i in range(4):  # the reply's ssids string grows with every network
            await c.command({"cmd": "addWifi", "payload": {"ssid": f"network-{i:02d}-abcdefgh", "pwd": "x"}})
        mark = len(probe.messages)
        command = {"cmd": "addWifi", "payload": {"ssid": "network-04-abcdefgh", "pwd": "x"}}
        await probe.publish(f"{base}/cmd", json.dumps(command))
        texts = await log_texts(c, 2)
        logged = json.loads(texts[1])
        assert logged["cmd"] == "addWifi" and logged["ssid"] == "network-04-abcdefgh"
        packet = 5 + 2 + len(info) + len(texts[1].encode())
        assert packet > 256, packet
        await asyncio.sleep(0.3)
        assert probe.on(info, mark) == [], "a reply over 256 bytes was published"

        long_payload = json.dumps({"cmd": "getVoltage", "pad": "x" * 300})
        await probe.publish(f"{base}/cmd", long_payload)
        await probe.publish(f"{base}/cmd", json.dumps({"cmd": "getPeriod"}))
        reply = json.loads((await probe.wait(lambda m: m.topic == info, since=mark)).text)
        assert reply["cmd"] == "getPeriod", "the over-long command was not ignored"
        texts = await log_texts(c, 1)
        assert "getPeriod" in texts[0] and "pad" not in texts[0]
    await c.close()


async def test_mqtt_sampling_one_message_per_sample(make_meter: MeterFactory, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """§4.14: one JSON message per sample on …/state/info with the session's unit, the meter's
    publish time and exactly the samples the meter produced; each is also logged at INFO; the
    stop reply (over MQTT) comes after the tail and counts them all (§4.8)."""
    meter = await connected_meter(make_meter, mqtt_broker)
    info, sample = topics(meter.name)
    c = await open_client(meter.command_port)
    async with Probe(*mqtt_broker) as probe:
        mark = len(probe.messages)
        start = {"cmd": "sample", "payload": {"type": "MQTT", "rate": 10, "measures": "v,i_RMS"}}
        await probe.publish(f"powermeter/{meter.name}/cmd", json.dumps(start))
        reply = json.loads((await probe.wait(lambda m: m.topic == info and '"cmd"' in m.text, since=mark)).text)
        assert reply["error"] is False and reply["conn_type"] == "MQTT"
        assert reply["unit"] == "V,V,V,mA,mA,mA" and reply["measures"] == "v,v,v,i,i,i_RMS"
        await asyncio.sleep(1.5)
        await probe.publish(f"powermeter/{meter.name}/cmd", json.dumps({"cmd": "stop"}))
        stop_msg = await probe.wait(lambda m: m.topic == info and '"stop"' in m.text, since=mark)
        stop = json.loads(stop_msg.text)
        msgs = [json.loads(m.text) for m in probe.on(info, mark) if m.text.startswith('{"unit"')]
        truth = meter.truth()
        assert truth is not None
        assert stop["sent_samples"] == len(msgs) == truth.values.shape[0] > 10
        assert all(list(m) == ["unit", "ts", "values"] and m["unit"] == "V,V,V,mA,mA,mA" for m in msgs)
        values = np.array([m["values"] for m in msgs], dtype=np.float32)
        np.testing.assert_array_equal(values, truth.values)
        # ts is the publish time on the meter's clock, never before the session started.
        stamps = [float(m["ts"]) for m in msgs]
        assert stamps == sorted(stamps) and stamps[0] >= float(reply["startTs"])
        order = [m.text for m in probe.on(sample, mark)]
        assert order[:2] == ["on", "off"]
        # The stop reply is the last message of the session on …/state/info (after the tail).
        assert probe.on(info, mark)[-1] is stop_msg
        # Every sample was logged at INFO to the TCP client as well.
        logged = await c.wait_line(lambda x: x.startswith(b"Info:[I]") and b'{"unit"' in x)
        assert json.loads(logged.split(b": ", 1)[1])["values"] == msgs[0]["values"]
    await c.close()


async def test_broker_down_and_restarted(make_meter: MeterFactory, tmp_path: Path) -> None:
    """§8.1/§4.9: losing the broker logs 'MQTT disconnected from', stops an MQTT session with
    'MQTT Server disconnected while streaming'; the reconnect task (1 s) brings the meter back
    with its subscriptions once the broker is up again, and it answers its topics."""
    broker = PrivateBroker(tmp_path)
    broker.start()
    try:
        meter = await connected_meter(make_meter, ("127.0.0.1", broker.port))
        c = await open_client(meter.command_port)
        reply = await c.command({"cmd": "sample", "payload": {"type": "MQTT", "rate": 2, "measures": "p,q"}})
        assert reply["error"] is False
        broker.stop()
        down = time.monotonic()
        texts = []
        while "MQTT Server disconnected while streaming" not in texts:
            line = (await c.read_line(timeout=3)).decode()
            texts.append(line.split(": ", 1)[1] if ": " in line else "")
        assert "MQTT disconnected from 127.0.0.1" in texts
        assert texts.index("MQTT disconnected from 127.0.0.1") < texts.index(
            "MQTT Server disconnected while streaming")
        assert time.monotonic() - down < 1.0
        assert (await c.command({"cmd": "info"}))["state"] == "idle"

        await asyncio.sleep(1.5)  # retries fail silently while the broker is down
        assert not meter.mqtt.connected()
        broker.start()
        up = time.monotonic()
        line = await c.wait_line(lambda x: b"MQTT connected to 127.0.0.1" in x, timeout=3)
        assert line.startswith(b"Info:[I]")
        assert time.monotonic() - up < 1.5  # the task tries every second
        assert await log_texts(c, 2) == ["Subscribing to: powermeter/+",
                                         f"Subscribing to: powermeter/{meter.name}/+"]
        info, _ = topics(meter.name)
        async with Probe("127.0.0.1", broker.port) as probe:
            await probe.publish(f"powermeter/{meter.name}/state", "")
            assert json.loads((await probe.wait(lambda m: m.topic == info)).text)["sampleState"] == "idle"
        await c.close()
    finally:
        broker.stop()


async def test_mqtt_server_set_while_broker_down_connects_later(make_meter: MeterFactory, tmp_path: Path) -> None:
    """§3.3: a failed attempt after ``mqttServer`` is silent; the reconnect task connects as
    soon as the broker appears."""
    broker = PrivateBroker(tmp_path)
    meter = await make_meter(mqtt_port=broker.port)
    c = await open_client(meter.command_port)
    try:
        reply = await c.command({"cmd": "mqttServer", "payload": {"server": "127.0.0.1"}},
                                timeout=5)
        assert reply["error"] is False
        broker.start()
        await c.wait_line(lambda x: x.endswith(b"MQTT connected to 127.0.0.1"), timeout=3)
        assert meter.mqtt.connected()
    finally:
        await c.close()
        broker.stop()
