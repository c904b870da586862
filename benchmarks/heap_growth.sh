#!/usr/bin/env bash
# What the acquisition process's C heap gains while a soak streams, by allocation site.
#
# Runs benchmarks/soak.py twice at the same time under heaptrack (every malloc, with its native
# backtrace; Debian's heaptrack package), with the read-back off, and SIGKILLs each acquisition
# process while its meters still stream: the first after EARLY seconds, the second after LATE.
# What each had allocated and not freed at that instant is its live heap; heaptrack_print's diff
# of the two is what the heap gained between EARLY and LATE, by backtrace. In-flight buffers
# (the packet tables' pending rows, the decoder's) show as sites that gained in one place and
# lost in another; a leak shows as a site that only gains.
#
#   bash benchmarks/heap_growth.sh [EARLY_S [LATE_S]]     # defaults 400 and 1000
#
# Limits: Python objects of up to 512 B live in pymalloc's arenas, which heaptrack does not see
# (soak.py --diagnose and --tracemalloc measure them); heaptrack slows every allocation, so the
# run is not a figure of CPU. Last line: "heap gained between EARLY s and LATE s: X (Y MB/h)".
set -euo pipefail

EARLY=${1:-400}
LATE=${2:-1000}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
command -v heaptrack >/dev/null || { echo "heap_growth: heaptrack is not installed (apt install heaptrack)" >&2; exit 2; }
(( EARLY >= 120 && LATE > EARLY )) || { echo "heap_growth: need 120 <= EARLY < LATE" >&2; exit 2; }
export SMARTMETER_SERVICES_ENV=${SMARTMETER_SERVICES_ENV:-$ROOT/var/run/services.env}
OUT=$(mktemp -d /tmp/heap_growth.XXXXXX)
echo "heap_growth: output in $OUT; soaks killed after $EARLY s and $LATE s; $(uptime | sed 's/.*load/load/')"

soak() {  # soak KILL_AFTER TAG: one traced soak in its own session, killed mid-stream
  local kill_after=$1 tag=$2 sid traced
  mkdir -p "$OUT/$tag"
  cd "$OUT/$tag"
  setsid heaptrack "$PY" "$ROOT/benchmarks/soak.py" --minutes $(( LATE / 60 + 5 )) \
    --no-read-back > soak.log 2>&1 &
  local session=$!
  sleep 5
  sid=$(ps -o sid= -p "$session" | tr -d ' ')
  # the traced process is the one started with heaptrack's preload in its environment
  traced=$(for p in $(pgrep -s "$sid" -f benchmarks/soak.py); do
             grep -qa libheaptrack "/proc/$p/environ" 2>/dev/null && echo "$p"; done | head -1)
  [[ -n $traced ]] || { echo "heap_growth: no traced soak found" >&2; pkill -9 -s "$sid"; return 1; }
  sleep $(( kill_after - 5 ))
  grep -q "zero loss\|Traceback" soak.log && { echo "heap_growth: the soak $tag ended early" >&2; }
  kill -9 "$traced"
  wait "$session" || true
  pkill -9 -s "$sid" || true  # the emulators and the catalog writer, orphaned by the kill
}

soak "$EARLY" early &
sleep 20  # the two runs' startups apart
soak "$LATE" late &
wait

early=$(ls "$OUT"/early/heaptrack.*.zst) late=$(ls "$OUT"/late/heaptrack.*.zst)
heaptrack_print -f "$late" -d "$early" -l 1 -p 0 -a 0 -T 0 -n 12 -s 3 2>/dev/null > "$OUT/diff.txt"
echo "largest changes of the live heap between the two instants (native frames only):"
grep -A14 "leaked over" "$OUT/diff.txt" | grep -v "^\s*in /\|^\s*at " | sed -n 1,80p
gained=$(sed -n 's/^total memory leaked: //p' "$OUT/diff.txt")
"$PY" - "$gained" "$EARLY" "$LATE" <<'EOF'
import re, sys
text, early, late = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
number, unit = re.fullmatch(r"(-?[0-9.]+)([KMG]?)B?", text.strip()).groups()
mb = float(number) * {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}[unit]  # as heaptrack_print prints
print(f"heap gained between {early:.0f} s and {late:.0f} s: {text} ({mb / ((late - early) / 3600):+.2f} MB/h)")
EOF
