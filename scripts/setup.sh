#!/usr/bin/env bash
# Prepare this checkout to run: a .venv with the package, and what the chosen job needs.
#
#   bash scripts/setup.sh --main   # the main job (scripts/demo.sh): .venv + the package only
#   bash scripts/setup.sh          # everything the tests need (scripts/test.sh): also the
#                                  # [test] extras and the Debian packages of the services
#
# The main job (emulated meters into the embedded catalog) needs no Debian package beyond
# Python 3.11 with venv, and none of the test extras (MQTT, mDNS, queueserver, linters).
# Idempotent and quick when nothing is missing: each step checks first and only acts on what
# is absent.  Needs root (or password-less sudo) only if a Debian package must be installed.
# Environment: PYTHON=<interpreter> picks the interpreter for a new .venv (default python3.11).
set -euo pipefail

case "${1:-}" in
  --main) JOB=main ;;
  ""|--test) JOB=test ;;
  *) printf 'setup: unknown argument %q (use --main or --test)\n' "$1" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PATH="$PATH:/usr/sbin:/sbin"
if [[ "$JOB" == test ]]; then
  APT_PACKAGES=(ffmpeg mosquitto chrony postgresql socat redis-server)
  EXTRAS="[test]"
else
  APT_PACKAGES=()
  EXTRAS=""
fi
started=$SECONDS
did=()

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------- Debian packages

package_present() {  # dpkg's word first; a binary on PATH counts too (non-Debian or manual installs)
  if command -v dpkg-query >/dev/null &&
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; then
    return 0
  fi
  case "$1" in
    chrony) command -v chronyd >/dev/null ;;
    postgresql) command -v pg_ctl >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1; fi
}

install_apt() {  # $@ = packages
  say "apt: installing $* ..."
  as_root true || die "not root and no password-less sudo; run as root: apt-get update && apt-get install -y --no-install-recommends $*"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq || die "apt-get update failed"
  as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
  did+=("apt: installed $*")
}

missing=()
for package in "${APT_PACKAGES[@]}"; do
  package_present "$package" || missing+=("$package")
done
if ((${#missing[@]})); then
  install_apt "${missing[@]}"
elif ((${#APT_PACKAGES[@]})); then
  say "apt: ${APT_PACKAGES[*]} already present"
fi

# ---------------------------------------------------------------------------- virtualenv

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  say "venv: $VENV exists ($("$VENV/bin/python" -V 2>&1))"
else
  python="$(pick_python)" || die "no Python >= 3.11 found (tried \$PYTHON, python3.11, python3)"
  if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    # Debian's own python3 ships venv/ensurepip in a separate package.
    install_apt "python3-venv"
  fi
  say "venv: creating $VENV with $python ($("$python" -V 2>&1)) ..."
  rm -rf "$VENV"
  "$python" -m venv "$VENV" || die "python -m venv failed"
  did+=("venv: created with $("$VENV/bin/python" -V 2>&1)")
fi

# ---------------------------------------------------------------------------- Python packages

# Every requirement of pyproject.toml (dependencies, + [test] for the tests) satisfied by what
# .venv holds, its console scripts installed as declared, and smartmeter_ophyd imported from
# this checkout?  Then pip has nothing to do.
requirements_satisfied() {
  "$VENV/bin/python" - "$ROOT" "$JOB" <<'EOF'
import importlib.metadata as md
import pathlib, sys, tomllib
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

root = pathlib.Path(sys.argv[1])
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
extras = project.get("optional-dependencies", {})
wanted = list(project["dependencies"])
if sys.argv[2] == "test":
    wanted += extras.get("test", [])
problems = []
seen = set()
while wanted:
    requirement = Requirement(wanted.pop(0))
    if requirement.name == project["name"]:  # "smartmeter-ophyd[mqtt,discovery]": its extras
        wanted += [r for extra in requirement.extras for r in extras.get(extra, [])]
        continue
    if str(requirement) in seen:
        continue
    seen.add(str(requirement))
    if requirement.marker is not None and not requirement.marker.evaluate():
        continue
    try:
        version = md.version(requirement.name)
    except md.PackageNotFoundError:
        problems.append(f"{requirement.name} missing")
        continue
    if version not in requirement.specifier:
        problems.append(f"{requirement.name} {version} does not satisfy {requirement.specifier}")
try:
    import smartmeter_ophyd
    if not pathlib.Path(smartmeter_ophyd.__file__).resolve().is_relative_to(root):
        problems.append(f"smartmeter_ophyd is imported from {smartmeter_ophyd.__file__}, not this checkout")
except ImportError:
    problems.append("smartmeter_ophyd not installed")
installed = {e.name: e.value for e in md.entry_points(group="console_scripts")}
for name, target in project.get("scripts", {}).items():
    if installed.get(name) != target:  # an install older than pyproject.toml's [project.scripts]
        problems.append(f"console script {name} -> {installed.get(name)}, not {target}")
for problem in problems:
    print(problem)
sys.exit(1 if problems else 0)
EOF
}

if reasons="$(requirements_satisfied 2>&1)"; then
  say "python: smartmeter-ophyd$EXTRAS and its requirements already installed"
else
  say "python: installing -e .$EXTRAS ($(head -n 3 <<<"$reasons" | paste -sd ';' -)) ..."
  if command -v uv >/dev/null; then
    uv pip install --quiet --python "$VENV/bin/python" -e ".$EXTRAS" \
      || die "uv pip install -e .$EXTRAS failed"
  else
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".$EXTRAS" \
      || die "pip install -e .$EXTRAS failed"
  fi
  reasons="$(requirements_satisfied 2>&1)" || die "still unsatisfied after install: $reasons"
  did+=("python: installed -e .$EXTRAS")
fi

if ((${#did[@]})); then
  summary="$(IFS=';'; echo "${did[*]}")"
else
  summary="nothing to do"
fi
say "done in $((SECONDS - started)) s: $summary"
