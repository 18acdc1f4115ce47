#!/bin/sh
# EXOD_RUNNER_WRAPPER for the fault tests. It runs inside the runner's process group, between
# the shim and the runner, and always starts a child of its own (`sleep`), whose pid it appends
# to $EXOD_HOME/wrapper-children: whatever ends the runner must end that child too.
#
# A test injects a fault at spawn by writing one line to $EXOD_HOME/wrapper-fault before it
# starts a run; the next runner consumes it:
#   exit N   exit with status N before the runner starts (exod sees a crash at spawn)
#   hang     never start the runner (exod sees a load that makes no progress)
# Without that file the wrapper starts the runner: exec "$@".
sleep 1000 &
echo $! >> "$EXOD_HOME/wrapper-children"
fault_file="$EXOD_HOME/wrapper-fault"
if [ -f "$fault_file" ]; then
  fault=$(cat "$fault_file")
  rm -f "$fault_file"
  case "$fault" in
    "exit "*) exit "${fault#exit }" ;;
    hang) sleep 1000 ;;
    *) echo "wrapper.sh: unknown fault '$fault'" >&2; exit 64 ;;
  esac
fi
exec "$@"
