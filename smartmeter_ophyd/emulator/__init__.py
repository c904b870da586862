"""Firmware-2.2-faithful SmartMeter emulator on real sockets (server role of the codec).

``EmulatedMeter(EmulatorConfig(...))`` is one meter: TCP command port (§2), raw stream port
(§7.1), UDP and serial (pty) sinks (§4.12, §4.13), stream-server dial-out (§7.2), NTP
(§6), MQTT to a real broker (§8, §4.14), mDNS (§9), persistence (§10), and a test-only
control channel (``_control``: ground truth,
clock steps, network delay, faults).  Several meters share one event loop;
``python -m smartmeter_ophyd.emulator --count N`` runs them.  ``EmulatorFleet`` runs N meters
and their SNTP responder on a private loop thread for synchronous code (tests, demos,
benchmarks), with per-meter clock and network settings.

Deliberate deviations from firmware 2.2 (everything else aims to be byte-exact):

* ``cmd`` echo (§2.9) is the command name unless ``corrupt_cmd_echo`` is set.
* ``reqSamples`` asking for more than the 1029-byte send buffer is emulated as an ERROR log
  (``reqSamples: <n> bytes overflow the 1040 byte send buffer``) and a reboot; the firmware
  corrupts memory.  Frames never include not-yet-written buffer memory (§5.2).
* Negative sampling rates are refused with ``SamplingRate could not be set to <rate>``.
* A second ``sample`` during a scheduled countdown replaces the pending start (the
  firmware may start twice, §6.4 #6); ``type:"FFMPEG"`` is accepted only while a raw
  stream client is pending and then streams to USB serial (§7.3).
* MQTT (``_mqtt``, §8): the broker port is ``mqtt_port`` (the firmware always dials 1883)
  and the status period ``mqtt_status_s`` (5 s).  A ``cmd`` payload that is not JSON gets
  the plain JSON-format-error reply; the firmware answers from stale documents, so its
  reply may also carry keys of the previous one (§8.3).
* mDNS (``_mdns``, §9; ``mdns=True``): ``_elec._tcp`` carries a ``cmd_port`` TXT record
  when the command port is not 54321; ArduinoOTA's ``_arduino._tcp`` is not announced.
* A command line without ``\\n`` waits 10 s for its end without stalling the meter (§2.1).
* The copy of each reply that goes to USB serial (§2.8) is the reply line itself.
* A meter built with ``serial=False`` answers ``type:"Serial"`` with
  ``Unsupported sampling type: Serial``.
* Not emitted: the serial-only debug prints of reqSamples/OTA/WiFi events (§4.12).
* The ring-buffer wrap-around corruption (§4.10) and the 20–24 character name overflow
  (§3.2) are not reproduced.
* Timing (``_sampling``, ``_clock``): the ADE9000 sample clock (``ade_drift_ppm``), the
  DS3231 RTC (``rtc_drift_ppm``) and the ESP's NTP-set software clock (``clock_offset_s``,
  ``drift_ppm``) are modelled apart, with constant drifts.  The RTC's seconds restart 0.5 s
  after each write of its seconds register (session start, NTP success on the main core),
  as the DS3231 data sheet implies for the firmware's writes (inferred, not measured).  The
  first kept ADE sample is at the session start (on the device its phase is arbitrary).
* Times round the software clock to the millisecond (``startTs``, ``start_ts``/``stop_ts``,
  ``From``/``To``, the scheduled start's ``now_ms``); the firmware's integer-millisecond
  clock truncates, and its SNTP result is truncated to the millisecond too (§6.2).
"""

from ._clock import SntpResult
from ._control import Corrections, SampleTimes
from ._fleet import EmulatorFleet, SntpResponder
from ._meter import EmulatedMeter, EmulatorConfig, Truth
from ._sampling import SessionTruth, SyncRecord

__all__ = [
    "Corrections",
    "EmulatedMeter",
    "EmulatorConfig",
    "EmulatorFleet",
    "SampleTimes",
    "SessionTruth",
    "SntpResponder",
    "SntpResult",
    "SyncRecord",
    "Truth",
]
