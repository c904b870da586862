"""Every text firmware 2.2 puts on the wire, in one place (protocol.md §2–§7).

Typos and odd separators are the firmware's own (§12 item 5) and must stay as they are:
clients match on them.  Format placeholders use ``str.format`` names.
"""

from __future__ import annotations

from typing import Final

DEVICE_TYPE: Final = "smartmeter"
VERSION: Final = "2.2"
COMPILED: Final = "Nov  3 2021 18:09:15"
DEFAULT_NAME: Final = "smartmeterX"
DEFAULT_TIME_SERVER: Final = "time.google.com"
UNSET: Final = "-"

# §2 transport
SETUP_DONE: Final = "Setup done"
CLIENT_CONNECTED: Final = "Client with IP {ip} connected on port {port}"
CLIENT_DISCONNECTED: Final = "Client disconnected {ip} port {port}"
TOO_MANY_CLIENTS: Final = "To much clients, could not add client"
JSON_FORMAT_ERROR: Final = 'JSON format error, syntax: {"cmd":<cmdName>, "[payload":{<data>}]}}'
UNKNOWN_COMMAND: Final = "unknown command"
RECEIVED_UNKNOWN_COMMAND: Final = "Received unknown command"
BUSY_WITH_IP: Final = "Device with IP: {ip} currently sampling"
BUSY: Final = "Currently sampling"
MESSAGE_OVER_SERIAL: Final = "MESSAGE Over Serial"

# §3 commands
LOG_LEVEL_MISSING: Final = "Not a valid Log level cmd, level missing"
LOG_LEVEL_UNKNOWN: Final = "Unknown log level: {level}"
LOG_LEVEL_SET: Final = "Log Level set to: {level}"
MDNS_MISSING: Final = "MDNS name required in payload with key name"
MDNS_TOO_LONG: Final = "MDNS name too long, only string of size 25 allowed"
MDNS_SET: Final = "Set MDNS name to: {name}"
MDNS_LOG: Final = "MDNS Name: {name}"
MQTT_MISSING: Final = "MQTTServer address required in payload with key server"
MQTT_TOO_LONG: Final = "MQTTServer address too long, only string of size 17 allowed"
MQTT_SET: Final = "Set MQTTServer address to: {server}"
MQTT_CANNOT_CONNECT: Final = "Cannot connect to MQTT Server {server}"
STREAM_MISSING: Final = "StreamServer address required in payload with key server"
STREAM_TOO_LONG: Final = "StreamServer address too long, only string of size 17 allowed"
STREAM_SET: Final = "Set StreamServer address to: {server}"
TIME_MISSING: Final = STREAM_MISSING  # sic: the firmware names the wrong server (§3.5)
TIME_TOO_LONG: Final = "TimeServer address too long, only string of size 25 allowed"
TIME_SET: Final = "Set TimeServer address to: {server}"
WIFI_ADD_MISSING: Final = "WiFi SSID and PWD required, for open networks, fill empty pwd"
WIFI_ADD_TOO_LONG: Final = "SSID or PWD too long, max: 20, 20"
WIFI_ADDED: Final = "New Ap, SSID: {ssid}, PW: {pwd}"
WIFI_DUPLICATE: Final = "Wifi AP {ssid} already in list"
WIFI_FULL: Final = "MAX # APs reached, need to delete first"
WIFI_DEL_MISSING: Final = "Required SSID to remove"
WIFI_DEL_TOO_LONG: Final = "SSID too long, max: 20"
WIFI_REMOVED: Final = "Removed SSID: {ssid}"
WIFI_NOT_FOUND: Final = "SSID {ssid} not found"
NTP_OK: Final = "Time synced"
NTP_FAILED: Final = "Error syncing time"
NTP_SYNCED_LOG: Final = "NTP synced with conf: {conf}"
CAL_MISSING: Final = "Missing cal constants"
CAL_TOO_FEW: Final = "Need at least 6 cal constants"
CAL_RANGE: Final = "Calibration parameter {index}: {value:.2f} not allowed [0.5-2.0]"
CAL_SET: Final = (
    "Calibration set: v1:{0:.2f}, i1:{1:.2f}, v2:{2:.2f}, i2:{3:.2f}, v3:{4:.2f}, i3:{5:.2f}"
)
ENERGY_NEED_3: Final = "Need 3 energy values"
ENERGY_RESET: Final = "Energy reset to [{0:.2f}, {1:.2f}, {2:.2f}], @{when}"
DAILY_MISSING: Final = "Missing hour/minute"
DAILY_HOUR: Final = "Hour must be in 24h format, -1 to disable"
DAILY_MINUTE: Final = "Minute must be -1<min<60, -1 to disable"
DAILY_DISABLED: Final = "Disabled daily restart"
DAILY_SET: Final = "Set daily restart to: {hour:02d}:{minute:02d}:00"
DAILY_NOW: Final = "Daily restart now!"
ADE_MISSING_ADDRESS: Final = "Missing Register address"
ADE_MISSING_SIZE: Final = "Missing Size, 16 or 32 Bit"
ADE_NOT_HEX: Final = "Register values should be hex strings (e.g. 0xab)"
ADE_READ: Final = "Addr: 0x{addr:04x}, Read: 0x{value:04x}"
ADE_WRITE: Final = ", Write: 0x{write:04x}, Re-Read: 0x{reread:04x}"
LOGFILE_MARK: Final = "*** LOGFile *** "
LOG_ROW_SEPARATOR: Final = "//n"
BOOT_ROW: Final = "Reboot - inited SPIFFS Logger"

# §4 sampling
SAMPLE_INVALID: Final = 'Not a valid "sample" command'
SAMPLE_TYPE_MISSING: Final = ', "type" missing'
SAMPLE_RATE_MISSING: Final = ', "rate" missing'
UNSUPPORTED_MEASURES: Final = "Unsupported measures{measures}"
RATE_NOT_SET: Final = "SamplingRate could not be set to {rate}"
RATE_LATCHED: Final = "SamplingRate cannot be higher than 50Hz in latch mode: {measures} sampling"
UNSUPPORTED_UDP_PORT: Final = "Unsupported UDP port{port}"
NO_TCP_STREAM: Final = "Could not connect to TCP stream"
UNSUPPORTED_TYPE: Final = "Unsupported sampling type: {type}"
RATE_LOG: Final = "{rate:.2f}Hz, {total}s"
MISSED: Final = "MISSED {n} SAMPLES"
"""ERROR, per RTC second that came up short (not after the first), §4.7."""
LOOP_BEHIND: Final = "Loop {n}s behind"
"""WARNING when more than one RTC second passed between two loop passes, §4.7."""
STOP_MSG: Final = "Received stop command"
TCP_LOST: Final = "TCP disconnected while streaming"
UDP_LOST: Final = "TCP/UDP disconnected while streaming"
MQTT_LOST: Final = "MQTT Server disconnected while streaming"
OVERFLOW: Final = "Overflow during ringBuffer write, lost {samples} samples"
SCHEDULE_OK: Final = "Should sample at: {when}//nStart sampling in: {delta}ms"
SCHEDULE_BAD: Final = "Should sample at: {when}//nCannot start sampling in: {delta}ms"
SCHEDULED_START_LOG: Final = "StartSampling @ {when}"

# §5 flow control
CTS_INVALID: Final = 'Info:Not a valid "cts" command'  # sic: the message itself starts with Info:
REQ_RANGE: Final = "stay between 10 and 100000 samples, not {n}"  # sic: the limit is 2000
SLOT_NOT_FINISHED: Final = "not finisched {n} missing"  # sic
SLOT_SENT: Final = "sent {n} samples"
# Emulator-only: firmware 2.2 corrupts memory here (§5.2); the emulator logs this and reboots.
REQ_SEND_BUFFER_OVERFLOW: Final = "reqSamples: {nbytes} bytes overflow the 1040 byte send buffer"

# §6 time
AFTER_NTP_RATE: Final = "After NTP Sync: avg rate {rate:.3f} Hz"
SHOULD_BE: Final = "Should be: {goal}, is {total} samples"
OFFSET_OF: Final = "Offset of {offset:.3f} s, SecondInterrupts {seconds}, SamplingDur {duration:.3f}"
FROM_TS: Final = "From {ts}"
TO_TS: Final = "To {ts}"
CORRECTING: Final = "Correcting: {n} samples"

# §7 stream server
STREAM_TRY: Final = "Try to connect Stream Server: {server}"
STREAM_CONNECTED: Final = "Connected to StreamServer: {server}"
STREAM_CANNOT: Final = "Cannot connect to StreamServer: {server}"

# §10 boot (serial, level ALL)
NETWORK_CONNECTED: Final = "Network Connected"
IP_LOG: Final = "IP: {ip}"
